"""Server settings: one model, four sources.

Precedence, highest first: command-line flags (passed as init kwargs), ``LEANSERVE_*`` environment
variables (nested sections with ``__``, e.g. ``LEANSERVE_ENGINE__MAX_NUM_SEQS=8``), the YAML file
named by ``config`` (or ``LEANSERVE_CONFIG``), then the defaults below. Sections merge key by key,
so a flag that sets one engine field leaves the YAML's other engine fields in place.

A value means the same from every source: each field is parsed by one validator here, which the CLI's
flags reuse. Mistakes are ``SettingsError`` (or pydantic's ``ValidationError``; see
``describe_validation_error``) with a message fit for one line of a terminal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from leanserve.engine.config import EngineConfig

ENV_PREFIX = "LEANSERVE_"

# LEANSERVE_* variables that are not settings fields: the modules named read them straight from
# os.environ. Every other LEANSERVE_* name must be a settings field (LEANSERVE_PORT,
# LEANSERVE_ENGINE__MAX_NUM_SEQS), so that a typo is an error instead of a setting silently left at
# its default. A module that reads a new variable must add it here (tests/api/test_settings.py
# greps src/ and kernels/ for them).
STANDALONE_ENV_VARS: dict[str, str] = {
    "LEANSERVE_CONFIG": "the YAML settings file (settings.py; also the `config` field)",
    "LEANSERVE_CACHE_DIR": "where converted GGUF checkpoints are kept (model/embedded.py)",
    "LEANSERVE_AWQ_BACKEND": "forces one AWQ kernel (quant/awq_linear.py)",
    "LEANSERVE_PDL": "0 turns programmatic dependent launch off (kernels/_device.py)",
    "LEANSERVE_KERNEL_CHECKS": "0 turns the Triton launchers' argument checks off (kernels/_checks.py)",
}

KV_CACHE_MEMORY_HELP = (
    "a number in (0, 1] is a fraction of the free device memory (1 = all of it), a percentage such as "
    "90% is the same, a whole number above 1 is bytes, and a size with a unit (512MiB, 8GiB, 4GB) is "
    "bytes; the same text means the same from the flag, the environment and the YAML file"
)

_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*([+-]?\.?[0-9][0-9_.]*(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::[0-9]+)?")


class SettingsError(ValueError):
    """A mistake in the settings or in what they point at; the message is one line for the user."""


def parse_kv_cache_memory(value: object) -> int | float:
    """``kv_cache_memory`` from any source: a fraction of free memory (float) or bytes (int).

    The one rule for every source (see ``KV_CACHE_MEMORY_HELP``). It exists because an env var and a
    flag arrive as text and YAML as a number: "1" from the flag used to mean all free memory while
    ``1`` from YAML or the environment meant one byte.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a number or a size")
    if isinstance(value, int):
        return _fraction_or_bytes(float(value), exact=value)
    if isinstance(value, float):
        return _fraction_or_bytes(value, exact=None)
    return _parse_kv_text(value)


def _parse_kv_text(text: str) -> int | float:
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError("neither a number nor a size such as 0.5, 90% or 8GiB")
    digits, unit = match.group(1).replace("_", ""), match.group(2).lower()
    try:
        number = float(digits)
    except ValueError:
        raise ValueError("not a number") from None
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError("a percentage must be in (0, 100]")
        return number / 100
    if unit:
        if unit not in _SIZE_UNITS:
            raise ValueError(f"unknown unit {match.group(2)!r} "
                             "(use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
        return _size_in_bytes(number * _SIZE_UNITS[unit])
    exact = int(digits) if digits.lstrip("+").isdigit() else None  # keeps big byte counts exact
    return _fraction_or_bytes(number, exact=exact)


def _fraction_or_bytes(number: float, exact: int | None) -> int | float:
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if number <= 0:
        raise ValueError("must be greater than 0")
    if number <= 1:
        return float(number)
    return exact if exact is not None else _whole_bytes(number)


def _size_in_bytes(number: float) -> int:
    """A size with a unit, to the nearest byte (1.3GiB is not a whole number of bytes)."""
    if not math.isfinite(number) or round(number) < 1:
        raise ValueError("a size must be at least 1 byte")
    return round(number)


def _whole_bytes(number: float) -> int:
    if not number.is_integer():
        raise ValueError("above 1 a number is bytes and must be whole "
                         "(a fraction of free memory is in (0, 1]; sizes take a unit, e.g. 1.5GiB)")
    return int(number)


def check_device_name(value: str) -> str:
    """``device`` spelled as the engine understands it; whether it is there is checked at start-up."""
    if not isinstance(value, str) or not _DEVICE_RE.fullmatch(value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


class EngineSettings(BaseModel):
    """Maps one to one onto ``EngineConfig`` (less ``model``, which is top level)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    block_size: int = Field(16, gt=0)
    # A float in (0, 1] is a fraction of the free device memory; an int is bytes (parse_kv_cache_memory).
    kv_cache_memory: int | float = 0.9
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)  # None: 256 on CPU, 2048 on CUDA
    max_model_len: int | None = Field(None, gt=0)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = Field(None, gt=0)
    cache_dir: str | None = None
    seed: int = 0
    cpu_matmul_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # see EngineConfig
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs
    max_cuda_graph_batch: int = Field(256, gt=0)

    @field_validator("device", mode="before")
    @classmethod
    def _device_name(cls, value: Any) -> str:
        return check_device_name(value)

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _kv_cache_memory(cls, value: Any) -> int | float:
        return parse_kv_cache_memory(value)


class CostSettings(BaseModel):
    """What the hardware costs, for the cost metrics (read by ``leanserve.metrics``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Per GPU-hour; on a CPU-only host, the price of the whole host for an hour. Unset: the metrics'
    # placeholder price for the device the engine will use (see metrics/cost.py).
    usd_per_gpu_hour: float | None = Field(None, ge=0)
    num_gpus: int = Field(1, ge=1)
    usd_per_host_hour: float | None = Field(None, ge=0)  # on CPU, wins over usd_per_gpu_hour if set
    window_seconds: float = Field(300.0, gt=0)  # the window of the recent-cost gauges


class SchedulerSettings(BaseModel):
    """Batching policy and window (engine/scheduler.py, engine/batch_window.py), as ``EngineConfig`` fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # "static" admits a new batch only when the previous one has finished: a baseline, not for serving.
    batching: Literal["continuous", "static"] = "continuous"
    max_batch_wait_ms: float = Field(20.0, ge=0)
    adaptive_batch_wait: bool = True


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        allow_inf_nan=False,
        # An empty LEANSERVE_API_KEY= means "no key", not "the empty key".
        env_ignore_empty=True,
    )

    config: str | None = None  # the YAML file these settings were read from, if any
    model: str | None = None  # a checkpoint folder, a .gguf file, or None for the embedded model
    served_model_name: str | None = None  # default: the model's folder name (see below)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    # Admission bound on sequences not yet finished (n and best_of count each sequence).
    max_queued_requests: int = Field(1024, gt=0)
    max_request_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    progress_interval_s: float = Field(5.0, ge=0)  # the progress log line while busy (0 = off)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        check_env_names(os.environ)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        # The YAML path is itself a setting: from the flag (init kwargs) or the environment.
        path = getattr(init_settings, "init_kwargs", {}).get("config") or os.environ.get("LEANSERVE_CONFIG")
        if path:
            if not Path(path).is_file():
                raise SettingsError(f"config file not found: {path}")
            sources.append(_YamlMappingSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _fill_defaults(self) -> ServerSettings:
        if not self.served_model_name:
            self.served_model_name = default_model_name(self.model)
        if self.cost.usd_per_gpu_hour is None:
            from leanserve.metrics.cost import DEFAULT_USD_PER_GPU_HOUR, DEFAULT_USD_PER_HOST_HOUR

            on_gpu = self.engine_config().resolve_device().type == "cuda"
            self.cost.usd_per_gpu_hour = DEFAULT_USD_PER_GPU_HOUR if on_gpu else DEFAULT_USD_PER_HOST_HOUR
        return self

    def engine_config(self) -> EngineConfig:
        """``EngineConfig`` from the engine and scheduler sections (fields it lacks are left out)."""
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        values = {**self.engine.model_dump(), **self.scheduler.model_dump(), "model": self.model}
        return EngineConfig(**{k: v for k, v in values.items() if k in known})


class _YamlMappingSource(YamlConfigSettingsSource):
    """The YAML file, which must parse and hold a mapping of settings (or nothing at all)."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:  # type: ignore[override]
        try:
            data = yaml.safe_load(Path(file_path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SettingsError(f"config file {file_path}: not valid YAML: {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {file_path}: cannot be read: {exc}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            kind = _YAML_KINDS.get(type(data), type(data).__name__)
            raise SettingsError(f"config file {file_path}: must be a mapping of settings (e.g. `port: 8000`), "
                                f"not {kind}")
        return data


_YAML_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message is several lines with a source excerpt; keep the problem and where it is."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context}{where}"
    return str(exc).splitlines()[0]


def check_env_names(environ: Mapping[str, str]) -> None:
    """Refuse LEANSERVE_* variables that are neither a settings field nor in ``STANDALONE_ENV_VARS``.

    pydantic-settings rejects an unknown nested name (LEANSERVE_ENGINE__MAX_NUM_SEQ) but skips an
    unknown top-level one (LEANSERVE_MODEL_CACHE), which would leave the setting meant silently at
    its default.
    """
    port = environ.get(f"{ENV_PREFIX}PORT", "")
    if port.startswith(("tcp://", "udp://")):
        raise SettingsError(
            f"{ENV_PREFIX}PORT={port} is a Kubernetes service link (a Service named leanserve in the "
            "namespace), not a port: set enableServiceLinks: false in the pod spec"
        )
    unknown = sorted(
        name for name in environ if _is_ours(name) and not _is_known(name) and not _SERVICE_LINK.fullmatch(name)
    )
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise SettingsError(
            f"unknown environment variable{plural} {', '.join(unknown)}: a LEANSERVE_* name must be a "
            "setting (LEANSERVE_PORT, LEANSERVE_ENGINE__MAX_NUM_SEQS, ...: see docs/api.md) or one of "
            f"{', '.join(STANDALONE_ENV_VARS)}"
        )


# What Kubernetes injects for a Service named leanserve (LEANSERVE_SERVICE_HOST, LEANSERVE_PORT_80_TCP_ADDR,
# ...): not ours to judge, and harmless since no setting has these names.
_SERVICE_LINK = re.compile(r"LEANSERVE_(SERVICE_(HOST|PORT)(_\w+)?|PORT_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)",
                           re.IGNORECASE)


def _is_ours(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX)  # pydantic-settings matches the prefix in any case


def _is_known(name: str) -> bool:
    upper = name.upper()
    if upper in STANDALONE_ENV_VARS:
        return True
    top = upper[len(ENV_PREFIX):].split("__", 1)[0].lower()
    return top in ServerSettings.model_fields


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``engine.dtype: Input should be ... (got 'int3')``."""
    return "; ".join(_describe_one(error) for error in exc.errors())


def _describe_one(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "settings"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown setting"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, (dict, list)) or value is None:
        return f"{where}: {message}"
    return f"{where}: {message} (got {value!r})"


def default_model_name(model: str | None) -> str:
    """The name of the folder the engine will load: the embedded model's, a GGUF's stem, a folder's."""
    if model is None:
        from leanserve.model.embedded import EMBEDDED_MODEL_NAME  # light: no torch

        return EMBEDDED_MODEL_NAME
    path = Path(model).expanduser()
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name or str(model)


def load_settings(**overrides: Any) -> ServerSettings:
    """Build settings with ``overrides`` (the CLI's flags) on top; ``None`` values mean "not given"."""
    return ServerSettings(**_drop_none(overrides))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out
