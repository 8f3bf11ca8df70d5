"""Settings precedence (flags > env > YAML > defaults), the shipped presets, and the CLI's wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from leanserve.cli import build_parser, serve_overrides
from leanserve.settings import ServerSettings, default_model_name, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LEANSERVE_"):
            monkeypatch.delenv(key)


def test_precedence_flags_env_yaml_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("port: 9000\nhost: 0.0.0.0\napi_key: from-yaml\n"
                      "engine:\n  max_num_seqs: 3\n  block_size: 32\n  seed: 7\n")
    monkeypatch.setenv("LEANSERVE_PORT", "9001")
    monkeypatch.setenv("LEANSERVE_ENGINE__MAX_NUM_SEQS", "5")
    monkeypatch.setenv("LEANSERVE_ENGINE__BLOCK_SIZE", "64")
    s = load_settings(config=str(config), engine={"block_size": 8, "device": None})
    assert s.engine.block_size == 8  # flag over env over YAML
    assert s.engine.max_num_seqs == 5  # env over YAML
    assert s.port == 9001  # env over YAML
    assert (s.host, s.api_key, s.engine.seed) == ("0.0.0.0", "from-yaml", 7)  # YAML over defaults
    assert s.engine.device == "auto" and s.max_queued_requests == 1024  # defaults
    cfg = s.engine_config()
    assert (cfg.block_size, cfg.max_num_seqs, cfg.seed, cfg.model) == (8, 5, 7, None)


def test_config_path_from_env_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("drain_timeout_s: 3\n")
    monkeypatch.setenv("LEANSERVE_CONFIG", str(config))
    assert load_settings().drain_timeout_s == 3
    with pytest.raises(FileNotFoundError):
        load_settings(config=str(tmp_path / "missing.yaml"))
    config.write_text("engine:\n  max_num_seqz: 3\n")  # a typo is an error, not a silent default
    with pytest.raises(ValidationError):
        load_settings()
    monkeypatch.setenv("LEANSERVE_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        ServerSettings()


def test_served_model_name_defaults_to_the_folder_name() -> None:
    assert default_model_name("/models/Llama-3.2-1B/") == "Llama-3.2-1B"
    assert default_model_name("/models/smol-q4.gguf") == "smol-q4"
    assert default_model_name(None) == "SmolLM2-135M-Instruct"
    assert load_settings(model="/m/x").served_model_name == "x"
    assert load_settings(model="/m/x", served_model_name="alias").served_model_name == "alias"


def test_presets_load() -> None:
    for name in ("default.yaml", "cpu-small.yaml"):
        s = load_settings(config=str(CONFIGS / name))
        s.engine_config()
    small = load_settings(config=str(CONFIGS / "cpu-small.yaml"))
    assert small.engine.device == "cpu" and small.cost.usd_per_gpu_hour == 0.10


def test_scheduler_and_cost_sections() -> None:
    s = load_settings(scheduler={"max_batch_wait_ms": 5.0, "adaptive_batch_wait": False},
                      engine={"device": "cpu"})
    assert s.scheduler.max_batch_wait_ms == 5.0
    cfg = s.engine_config()
    if hasattr(cfg, "max_batch_wait_ms"):  # the scheduler reads them from EngineConfig
        assert (cfg.max_batch_wait_ms, cfg.adaptive_batch_wait) == (5.0, False)
    assert s.cost.usd_per_gpu_hour is not None and s.cost.num_gpus == 1


def test_cli_serve_flags_become_overrides() -> None:
    args = build_parser().parse_args([
        "serve", "--model", "/m/tiny", "--port", "1234", "--api-key", "k", "--max-num-seqs", "4",
        "--kv-cache-memory", "0.5", "--no-prefix-caching", "--usd-per-gpu-hour", "1.5",
        "--max-batch-wait-ms", "3", "--drain-timeout", "2", "--cpu-matmul-dtype", "float32",
    ])
    s = load_settings(**serve_overrides(args))
    assert (s.model, s.port, s.api_key, s.drain_timeout_s) == ("/m/tiny", 1234, "k", 2.0)
    assert s.engine.cpu_matmul_dtype == "float32" and s.engine_config().cpu_matmul_dtype == "float32"
    assert s.engine.max_num_seqs == 4 and s.engine.kv_cache_memory == 0.5
    assert s.engine.enable_prefix_caching is False and s.engine.enable_chunked_prefill is True
    assert s.cost.usd_per_gpu_hour == 1.5 and s.scheduler.max_batch_wait_ms == 3
    bytes_args = build_parser().parse_args(["serve", "--kv-cache-memory", "4000000000"])
    assert load_settings(**serve_overrides(bytes_args)).engine.kv_cache_memory == 4_000_000_000
    # Flags not given leave the lower layers alone.
    bare = serve_overrides(build_parser().parse_args(["serve"]))
    assert load_settings(**bare).port == 8000


def test_cli_lists_subcommands() -> None:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "serve" in choices and "router" in choices
