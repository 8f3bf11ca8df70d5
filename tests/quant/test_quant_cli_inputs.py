"""`leanserve quantize` / `eval` inputs: bad values are one-line errors (exit 2) found before any work,
--out never destroys anything, and what quantize writes is readable by other users."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from leanserve.quant import cli
from leanserve.quant.cli import main
from leanserve.quant.evaluate import DatasetResult, EvalResult, WeightMemory, format_table
from tests.conftest import build_tiny_checkpoint

FAST = ["--method", "rtn", "--group-size", "32", "--skip-eval"]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded or generates text: bad inputs must be caught before that."""
    from leanserve.model import loader
    from leanserve.quant import awq, evaluate

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    for module, name in ((loader, "load_model"), (evaluate, "load_model"), (awq, "self_generated_calibration")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def texts(tmp_path: Path) -> dict[str, str]:
    """Paths the parametrized cases refer to by name."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text(" ".join(f"t{i}" for i in range(3, 23)))  # 25 tokens in its first 80%
    (tmp_path / "afile").write_text("x")
    (tmp_path / "not-a-model").mkdir()
    return {
        "empty": str(tmp_path / "empty.txt"), "short": str(tmp_path / "short.txt"),
        "missing": str(tmp_path / "missing.txt"), "file": str(tmp_path / "afile"),
        "not-a-model": str(tmp_path / "not-a-model"), "missing-model": str(tmp_path / "no-such-model"),
    }


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI expecting a bad-input exit: status 2 and an error line on stderr, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("leanserve quantize: error:", "leanserve eval: error:")), err
    return last


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--group-size", "0"], "--group-size: must be greater than 0, got '0'"),
        (["--group-size", "-32"], "--group-size: must be greater than 0, got '-32'"),
        (["--group-size", "abc"], "--group-size: not a whole number: 'abc'"),
        (["--group-size", "48"], "does not divide"),
        (["--samples", "0"], "--samples: must be greater than 0, got '0'"),
        (["--samples", "-3"], "--samples: must be greater than 0, got '-3'"),
        (["--seq-len", "0"], "--seq-len: must be greater than 0"),
        (["--seq-len", "4096"], "--seq-len 4096 is longer than the model's context (512 positions)"),
        (["--n-grid", "0"], "--n-grid: must be greater than 0"),
        (["--search-tokens", "0"], "--search-tokens: must be greater than 0"),
        (["--max-ppl-increase", "-1"], "--max-ppl-increase: must be 0 or more, got '-1'"),
        (["--max-ppl-increase", "nan"], "--max-ppl-increase: must be a finite number"),
        (["--eval-fraction", "0"], "--eval-fraction: must be between 0 and 1 (both excluded), got '0'"),
        (["--eval-fraction", "1.5"], "--eval-fraction: must be between 0 and 1 (both excluded), got '1.5'"),
        (["--window", "1"], "--window: must be at least 2, got '1'"),
        (["--window", "4096"], "--window 4096 is longer than the model's context"),
        (["--calib", "{missing}"], "--calib: no such file: {missing}"),
        (["--calib", "{empty}"], "--calib {empty} is too short: its first 80% has 0 tokens, one sample needs"),
        (["--calib", "{short}", "--seq-len", "32"], "its first 80% has 25 tokens, one sample needs --seq-len 32"),
        (["--data", "{missing}"], "--data: no such file: {missing}"),
        (["--data", "{empty}"], "--data {empty} is too short: its held-out last 20% has 0 tokens"),
        (["--model", "{missing-model}"], "--model: no such model folder or .gguf file: {missing-model}"),
        (["--model", "{not-a-model}"], "neither a model folder (with config.json) nor a .gguf file: {not-a-model}"),
        (["--out", "{file}"], "exists and is not a folder"),
    ],
)
def test_quantize_rejects_bad_input_before_any_work(
    extra: list[str], expected: str, tiny_llama: Path, word_text: Path, texts: dict[str, str], tmp_path: Path,
    no_work: None, capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "out"
    base = ["quantize", "--model", str(tiny_llama), "--out", str(out), "--data", str(word_text),
            "--window", "128"]
    line = _usage_error([*base, *(a.format(**texts) for a in extra)], capsys)
    assert expected.format(**texts) in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.fixture(scope="module")
def other_vocab_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "smaller": build_tiny_checkpoint(root / "smaller", vocab_size=200),
        "other-words": build_tiny_checkpoint(root / "chat", chat_tokens=True),  # same size, other tokens
    }


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model", "{missing-model}"], "--model: no such model folder or .gguf file: {missing-model}"),
        (["--baseline", "{missing-model}"], "--baseline: no such model folder or .gguf file: {missing-model}"),
        (["--data", "{missing}"], "--data: no such file: {missing}"),
        (["--data", "{empty}"], "--data {empty} is too short: its held-out last 20% has 0 tokens, one --window"),
        (["--eval-fraction", "0"], "--eval-fraction: must be between 0 and 1 (both excluded), got '0'"),
        (["--eval-fraction", "1.5"], "--eval-fraction: must be between 0 and 1 (both excluded), got '1.5'"),
        (["--window", "0"], "--window: must be greater than 0, got '0'"),
        (["--window", "4096"], "--window 4096 is longer than the model's context"),
        (["--eval-tokens", "0"], "--eval-tokens: must be greater than 0"),
        (["--baseline", "{smaller}"], "--model has 300 vocabulary entries and --baseline 200"),
        (["--baseline", "{other-words}"], "their tokenizers map text to different token ids"),
    ],
)
def test_eval_rejects_bad_input_before_any_work(
    extra: list[str], expected: str, tiny_llama: Path, word_text: Path, texts: dict[str, str],
    other_vocab_models: dict[str, Path], no_work: None, capsys: pytest.CaptureFixture,
) -> None:
    names = {**texts, **{k: str(v) for k, v in other_vocab_models.items()}}
    base = ["eval", "--model", str(tiny_llama), "--data", str(word_text), "--window", "128"]
    line = _usage_error([*base, *(a.format(**names) for a in extra)], capsys)
    assert expected.format(**names) in line


def test_default_eval_texts_missing_asks_for_data(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_work: None, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(cli, "DATA_DIR", tmp_path / "no-data-here")
    line = _usage_error(["eval", "--model", str(tiny_llama)], capsys)
    assert "no --data given" in line and "pass --data FILE" in line
    out = tmp_path / "out"
    line = _usage_error(["quantize", "--model", str(tiny_llama), "--out", str(out), "--method", "rtn"], capsys)
    assert "pass --data FILE or --skip-eval" in line
    assert not out.exists()


def test_default_data_dir_only_beside_a_source_checkout(tmp_path: Path) -> None:
    installed = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "leanserve" / "quant" / "cli.py"
    installed.parent.mkdir(parents=True)
    installed.touch()
    assert cli.checkout_data_dir(installed) is None  # not <venv>/lib/shared/data
    checkout = tmp_path / "repo"
    (checkout / "src" / "leanserve" / "quant").mkdir(parents=True)
    (checkout / "pyproject.toml").touch()
    assert cli.checkout_data_dir(checkout / "src" / "leanserve" / "quant" / "cli.py") == tmp_path / "shared" / "data"
    # This checkout keeps its default: ../shared/data beside the repository.
    assert cli.DATA_DIR == Path(__file__).resolve().parents[2].parent / "shared" / "data"


# ---- --out -----------------------------------------------------------------------------------------


@pytest.fixture
def src_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model: a test that fails may not damage the session's model."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "src"))


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_never_overwrites_the_source(where: str, src_copy: Path, capsys: pytest.CaptureFixture) -> None:
    out = {"same": src_copy, "inside": src_copy / "awq", "parent": src_copy.parent}[where]
    before = {p.name: p.read_bytes() for p in src_copy.iterdir()}
    line = _usage_error(["quantize", "--model", str(src_copy), "--out", str(out), *FAST], capsys)
    assert "source model" in line
    assert {p.name: p.read_bytes() for p in src_copy.iterdir()} == before


def test_out_refuses_a_foreign_non_empty_folder(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        line = _usage_error(["quantize", "--model", str(tiny_llama), "--out", str(out), *FAST, *flags], capsys)
        assert "not a `leanserve quantize` checkpoint" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_replaces_a_previous_checkpoint_only_with_overwrite(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "awq"
    out.mkdir()  # an empty folder is fine
    assert main(["quantize", "--model", str(tiny_llama), "--out", str(out), *FAST]) == 0
    again = ["quantize", "--model", str(tiny_llama), "--out", str(out), *FAST, "--group-size", "64"]
    assert "pass --overwrite to replace it" in _usage_error(again, capsys)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert main([*again, "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["awq"]  # no staging or set-aside folder left


def test_checkpoint_is_readable_by_other_users(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "awq"
    umask = os.umask(0o077)  # even a private umask: the image serves it as another uid
    try:
        assert main(["quantize", "--model", str(tiny_llama), "--out", str(out), *FAST]) == 0
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= modes.keys()
    assert set(modes.values()) == {0o644}, modes


# ---- the table -------------------------------------------------------------------------------------


def test_table_without_baseline_keeps_its_columns() -> None:
    memory = WeightMemory(1 << 20, 1 << 19, 1 << 19)
    result = EvalResult("m", None, memory, None, [DatasetResult("words", 1022, 48215.683)])
    lines = format_table(result).splitlines()
    header, row = lines[1], lines[3]
    assert len(row) == len(header)
    assert row.split() == ["words", "1022", "48215.683", "-", "-", "-", "-"]
