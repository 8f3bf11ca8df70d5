"""`leanserve` itself: the help a user reads, and `serve` refusing a user's mistakes before it listens."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanserve.cli import build_parser, main
from tests.server_thread import free_port

DOCS_API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("LEANSERVE_"):
            monkeypatch.delenv(key)


def serve(*argv: str) -> int:
    """``leanserve serve ARGV`` in this process, on 127.0.0.1 and a free port; its exit status."""
    try:
        return main(["serve", "--host", "127.0.0.1", "--port", str(free_port()), *argv])
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


def test_help_describes_the_tool_to_its_users() -> None:
    description = build_parser().description or ""
    assert "OpenAI-compatible" in description
    assert "argparse" not in description and "module" not in description


def serve_flags() -> set[str]:
    subparsers = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    serve_parser = subparsers.choices["serve"]  # type: ignore[attr-defined]
    return {flag for action in serve_parser._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def docs_table_flags() -> set[str]:
    """The flags named in docs/api.md's settings table (the rows of the table under `| Setting |`)."""
    lines = DOCS_API.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Setting | Flag |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[2])  # the Flag column
    return set(re.findall(r"--[a-z][a-z-]*", " ".join(rows)))


def test_every_serve_flag_is_in_the_docs_table() -> None:
    flags, documented = serve_flags(), docs_table_flags()
    assert flags - documented == set(), "serve flags missing from docs/api.md's settings table"
    assert documented - flags == set(), "docs/api.md's settings table names flags serve does not have"


# ---- mistakes found before the port is bound ----------------------------------------------------------
def assert_one_line_error(err: str, needle: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("leanserve serve: error:") and needle in last, err


@pytest.fixture
def cpu_only_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "/nonexistent/model"], "no such file or directory"),
    (["--dtype", "int3"], "invalid choice: 'int3'"),
    (["--device", "tpu"], "must be auto, cpu, cuda or cuda:N"),
    (["--kv-cache-memory", "1.5"], "above 1 a number is bytes"),
])
def test_serve_flags_are_checked_up_front(argv: list[str], needle: str, tiny_llama_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny model first, so that only the flag under test is wrong (argparse keeps the last --model).
    assert serve("--model", str(tiny_llama_dir), "--device", "cpu", *argv) == 2
    assert_one_line_error(capsys.readouterr().err, needle)


def test_model_paths_are_checked_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(os.urandom(256))
    for model, needle in ((tmp_path, "no config.json"), (bad_gguf, "not a GGUF file")):
        assert serve("--model", str(model), "--device", "cpu") == 2
        assert_one_line_error(capsys.readouterr().err, needle)


def test_cuda_on_a_cpu_only_build(cpu_only_build: None, tiny_llama_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert serve("--model", str(tiny_llama_dir), "--device", "cuda") == 2
    assert_one_line_error(capsys.readouterr().err, "has no CUDA support")


@pytest.mark.parametrize(("text", "needle"), [
    ("port: [8000\n", "not valid YAML"),
    ("- port\n- 8000\n", "must be a mapping of settings"),
    ("port 8000\n", "must be a mapping of settings"),
])
def test_config_file_must_be_a_yaml_mapping(text: str, needle: str, tmp_path: Path, tiny_llama_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    assert serve("--model", str(tiny_llama_dir), "--device", "cpu", "--config", str(config)) == 2
    assert_one_line_error(capsys.readouterr().err, needle)


def test_environment_mistakes(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LEANSERVE_MODEL_CACHE", "/x")  # meant LEANSERVE_CACHE_DIR
    # A missing model too: the old code ignored the variable and would otherwise have served.
    assert serve("--model", "/nonexistent/model") == 2
    assert_one_line_error(capsys.readouterr().err, "unknown environment variable LEANSERVE_MODEL_CACHE")
    monkeypatch.delenv("LEANSERVE_MODEL_CACHE")
    # 1000 bytes; one block of the tiny model is 16 tokens x 2 layers x K,V x 2 heads x 16 x 4 B = 8192 B.
    monkeypatch.setenv("LEANSERVE_ENGINE__KV_CACHE_MEMORY", "1000")
    assert serve("--model", str(tiny_llama_dir), "--device", "cpu") == 2
    assert_one_line_error(capsys.readouterr().err, "holds no KV cache block")
    monkeypatch.setenv("LEANSERVE_ENGINE__DTYPE", "int3")
    monkeypatch.delenv("LEANSERVE_ENGINE__KV_CACHE_MEMORY")
    assert serve("--model", str(tiny_llama_dir), "--device", "cpu") == 2
    assert_one_line_error(capsys.readouterr().err, "engine.dtype")


# ---- a model that fails while loading -------------------------------------------------------------
def test_a_model_that_fails_to_load_exits_1_with_one_error_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Past the up-front checks (a valid config.json), the weights are damaged: the real process logs
    one ERROR line naming the model and exits non-zero, so that an orchestrator restarts it."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix == ".json":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LEANSERVE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "leanserve.cli", "serve", "--model", str(broken), "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(free_port()), "--drain-timeout", "1"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and str(broken) in errors[0] and "failed to load" in errors[0], proc.stderr
