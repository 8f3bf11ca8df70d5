"""Settings precedence (flags > env > YAML > defaults), the shipped presets, and the CLI's wiring."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from leanserve.cli import build_parser, serve_overrides
from leanserve.settings import (
    STANDALONE_ENV_VARS,
    ServerSettings,
    SettingsError,
    default_model_name,
    describe_validation_error,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("LEANSERVE_"):
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
    with pytest.raises(SettingsError, match="config file not found"):
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


# ---- one reading of kv_cache_memory, whatever the source ----------------------------------------------
def kv_from_every_source(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """kv_cache_memory as settings hold it when ``text`` comes from the flag, the environment and YAML
    (as YAML reads it: a number stays a number)."""
    flag = serve_overrides(build_parser().parse_args(["serve", "--kv-cache-memory", text]))
    from_flag = load_settings(**flag).engine.kv_cache_memory
    monkeypatch.setenv("LEANSERVE_ENGINE__KV_CACHE_MEMORY", text)
    from_env = load_settings().engine.kv_cache_memory
    monkeypatch.delenv("LEANSERVE_ENGINE__KV_CACHE_MEMORY")
    config = tmp_path / "kv.yaml"
    config.write_text(f"engine:\n  kv_cache_memory: {text}\n")
    from_yaml = load_settings(config=str(config)).engine.kv_cache_memory
    return [from_flag, from_env, from_yaml]


KV_MEANINGS = {
    "1": 1.0,  # all free memory, never one byte
    "0.5": 0.5,
    ".5": 0.5,  # float() reads it, so the flag always did
    "90%": 0.9,
    "1073741824": 1 << 30,
    "4e9": 4_000_000_000,
    "512MiB": 512 << 20,
    "8GiB": 8 << 30,
    "4GB": 4_000_000_000,
}


def test_kv_cache_memory_means_the_same_from_every_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for text, meaning in KV_MEANINGS.items():
        values = kv_from_every_source(text, tmp_path, monkeypatch)
        assert values == [meaning] * 3, text
        # A fraction stays a float and bytes an int: that is how the engine tells them apart.
        assert all(type(v) is type(meaning) for v in values), (text, values)


def test_kv_cache_memory_refuses_nonsense_from_every_source(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "kv.yaml"
    for text in ("0", "-1", "1.5", "nan", "inf", "true", "150%", "8XB", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--kv-cache-memory", text])
        monkeypatch.setenv("LEANSERVE_ENGINE__KV_CACHE_MEMORY", text)
        with pytest.raises(ValidationError, match="kv_cache_memory"):
            load_settings()
        monkeypatch.delenv("LEANSERVE_ENGINE__KV_CACHE_MEMORY")
        config.write_text(f"engine:\n  kv_cache_memory: {text}\n")
        with pytest.raises(ValidationError, match="kv_cache_memory"):
            load_settings(config=str(config))


# ---- values checked wherever they come from -----------------------------------------------------------
def test_device_dtype_and_numbers_are_checked_from_every_source(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for env, value in (("ENGINE__DEVICE", "tpu"), ("ENGINE__DTYPE", "int3"), ("COST__USD_PER_GPU_HOUR", "nan"),
                       ("DRAIN_TIMEOUT_S", "inf"), ("SCHEDULER__MAX_BATCH_WAIT_MS", "-1")):
        monkeypatch.setenv(f"LEANSERVE_{env}", value)
        with pytest.raises(ValidationError) as info:
            load_settings()
        message = describe_validation_error(info.value)
        assert "\n" not in message and env.lower().replace("__", ".") in message, message
        monkeypatch.delenv(f"LEANSERVE_{env}")
    config = tmp_path / "c.yaml"
    config.write_text("engine:\n  device: cuda:x\n")
    with pytest.raises(ValidationError, match="must be auto, cpu, cuda or cuda:N"):
        load_settings(config=str(config))
    assert load_settings(engine={"device": "cuda:1"}).engine.device == "cuda:1"  # present or not: checked at start


@pytest.mark.parametrize(("text", "needle"), [
    ("port: [8000\n", "not valid YAML: .* at line 2"),
    ("- port\n- 8000\n", "must be a mapping of settings .* not a list"),
    ("8000\n", "must be a mapping of settings .* not a number"),
])
def test_the_config_file_must_be_a_yaml_mapping(text: str, needle: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=needle) as info:
        load_settings(config=str(config))
    assert "\n" not in str(info.value)
    config.write_text("")  # an empty file is no settings, not a mistake
    assert load_settings(config=str(config)).port == 8000


# ---- LEANSERVE_* environment variables ---------------------------------------------------------------
def test_kubernetes_service_links_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Kubernetes injects for a Service named leanserve passes the unknown-name check, and the one
    that collides with a setting (LEANSERVE_PORT=tcp://...) says what it is."""
    for name, value in {"LEANSERVE_SERVICE_HOST": "10.0.0.7", "LEANSERVE_SERVICE_PORT": "80",
                        "LEANSERVE_SERVICE_PORT_HTTP": "80", "LEANSERVE_PORT_80_TCP": "tcp://10.0.0.7:80",
                        "LEANSERVE_PORT_80_TCP_PROTO": "tcp", "LEANSERVE_PORT_80_TCP_PORT": "80",
                        "LEANSERVE_PORT_80_TCP_ADDR": "10.0.0.7"}.items():
        monkeypatch.setenv(name, value)
    assert load_settings().port == 8000
    monkeypatch.setenv("LEANSERVE_PORT", "tcp://10.0.0.7:80")
    with pytest.raises(SettingsError, match="service link.*enableServiceLinks: false"):
        load_settings()


def test_unknown_environment_variables_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEANSERVE_MODEL_CACHE", "/x")  # a typo of LEANSERVE_CACHE_DIR
    with pytest.raises(SettingsError, match="unknown environment variable LEANSERVE_MODEL_CACHE.*LEANSERVE_CACHE_DIR"):
        load_settings()
    monkeypatch.delenv("LEANSERVE_MODEL_CACHE")
    monkeypatch.setenv("leanserve_prot", "9000")  # pydantic-settings reads names in any case
    with pytest.raises(SettingsError, match="leanserve_prot"):
        load_settings()
    monkeypatch.delenv("leanserve_prot")
    for name in STANDALONE_ENV_VARS:
        if name != "LEANSERVE_CONFIG":
            monkeypatch.setenv(name, "0")
    monkeypatch.setenv("LEANSERVE_PORT", "9000")
    monkeypatch.setenv("LEANSERVE_ENGINE__SEED", "3")
    s = load_settings()
    assert (s.port, s.engine.seed) == (9000, 3)


def test_the_standalone_list_names_every_variable_the_code_reads() -> None:
    """Each LEANSERVE_* name read straight from the environment in src/ or kernels/ is listed, and each
    listed name is still read somewhere (or the list would excuse typos of a variable long gone)."""
    read = re.compile(r"""(?:environ(?:\.get)?|getenv)\s*[(\[]\s*["'](LEANSERVE_[A-Z0-9_]+)["']""")
    found: set[str] = set()
    for folder in (ROOT / "src", ROOT / "kernels"):
        for path in folder.rglob("*.py"):
            found |= set(read.findall(path.read_text()))
    assert found == set(STANDALONE_ENV_VARS), (found, set(STANDALONE_ENV_VARS))
