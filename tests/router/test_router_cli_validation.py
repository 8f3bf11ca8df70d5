"""`leanserve router` refuses bad arguments up front (one line, exit status 2, nothing started) and
keeps httpx's per-poll INFO lines out of its log."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from leanserve.router.cli import add_router_subcommand, run_router

REPLICA = ["--replica", "http://127.0.0.1:8000"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="leanserve")
    add_router_subcommand(parser.add_subparsers(dest="command"))
    return parser.parse_args(["router", *argv])


@pytest.fixture
def served(monkeypatch) -> list[dict]:
    """Stands in for uvicorn.run: records what would have been served instead of serving it."""
    calls: list[dict] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


@pytest.fixture
def restore_logging():
    names = ("", "httpx", "httpcore")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    yield
    for n, (level, handlers) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).handlers[:] = handlers


BAD = [  # wrong only together, or only once parsed: run_router says so
    pytest.param([], "nowhere to send requests", id="no-replica-no-discovery"),
    pytest.param(["--discover", "svc"], "--discover wants HOST:PORT, got 'svc'", id="discover-no-port"),
    pytest.param(["--discover", "http://svc:8000"], "--discover wants HOST:PORT", id="discover-url"),
    pytest.param(["--discover", "svc:99999"], "--discover wants HOST:PORT", id="discover-port-range"),
    pytest.param(["--replica", "foo"], "--replica 'foo': want http://HOST:PORT", id="replica-no-scheme"),
    pytest.param(["--replica", "localhost:8000"], "--replica 'localhost:8000'", id="replica-host-port"),
    pytest.param(["--replica", "http://a:notaport"], "--replica 'http://a:notaport'", id="replica-bad-port"),
    pytest.param([*REPLICA, "--canary", "ftp://c"], "--canary 'ftp://c'", id="canary-scheme"),
    pytest.param([*REPLICA, "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas",
                 id="max-below-min"),
]

BAD_VALUES = [  # wrong on their own: argparse's types refuse them while parsing
    pytest.param(["--canary-weight", "2"], "argument --canary-weight: must be in [0, 1], got '2'",
                 id="canary-weight-2"),
    pytest.param(["--canary-weight", "nan"], "argument --canary-weight", id="canary-weight-nan"),
    pytest.param(["--log-level", "verbose"], "argument --log-level: invalid choice: 'verbose'", id="log-level"),
    pytest.param(["--max-attempts", "0"], "argument --max-attempts: must be greater than 0, got '0'",
                 id="max-attempts-0"),
    pytest.param(["--poll-interval", "0"], "argument --poll-interval", id="poll-interval-0"),
    pytest.param(["--eject-after", "0"], "argument --eject-after", id="eject-after-0"),
    pytest.param(["--port", "70000"], "argument --port", id="port-range"),
    pytest.param(["--latency-target", "-1"], "argument --latency-target", id="latency-target-negative"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_arguments_are_one_line_and_status_2(argv, message, served, restore_logging, capsys):
    rc = run_router(parse(*argv))
    err = capsys.readouterr().err
    assert rc == 2 and not served
    assert err.startswith("leanserve router: error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES)
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(*REPLICA, *argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err, err
    assert "Traceback" not in err


def test_module_entry_point_exits_2_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "leanserve.router", "--discover", "svc", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == "leanserve router: error: --discover wants HOST:PORT, got 'svc'\n"


def test_httpx_poll_lines_are_quiet_unless_debugging(served, restore_logging):
    logging.getLogger().handlers.clear()  # as in a fresh process (pytest adds its own), so basicConfig applies
    # Arguments the checks must let through, the level in capitals as before.
    assert run_router(parse(*REPLICA, "--canary", "https://c:443/", "--canary-weight", "0.1",
                            "--discover", "svc.ns.svc.cluster.local:8000", "--log-level", "INFO")) == 0
    assert len(served) == 1 and served[0]["log_level"] == "info"
    assert logging.getLogger().level == logging.INFO  # the router's own lines
    for name in ("httpx", "httpcore"):  # one INFO line per health and metrics poll: not at INFO
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    assert run_router(parse(*REPLICA, "--log-level", "debug")) == 0
    for name in ("httpx", "httpcore"):  # but debugging a replica's polls needs them
        assert logging.getLogger(name).getEffectiveLevel() == logging.DEBUG
