"""Server settings: one model, four sources.

Precedence, highest first: command-line flags (passed as init kwargs), ``LEANSERVE_*`` environment
variables (nested sections with ``__``, e.g. ``LEANSERVE_ENGINE__MAX_NUM_SEQS=8``), the YAML file
named by ``config`` (or ``LEANSERVE_CONFIG``), then the defaults below. Sections merge key by key,
so a flag that sets one engine field leaves the YAML's other engine fields in place.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from leanserve.engine.config import EngineConfig


class EngineSettings(BaseModel):
    """Maps one to one onto ``EngineConfig`` (less ``model``, which is top level)."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    dtype: str = "auto"
    block_size: int = Field(16, gt=0)
    # An int is bytes; a float in (0, 1] is a fraction of the free device memory.
    kv_cache_memory: int | float = Field(0.9, gt=0)
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


class CostSettings(BaseModel):
    """What the hardware costs, for the cost metrics (read by ``leanserve.metrics``)."""

    model_config = ConfigDict(extra="forbid")

    # Per GPU-hour; on a CPU-only host, the price of the whole host for an hour. Unset: the metrics'
    # placeholder price for the device the engine will use (see metrics/cost.py).
    usd_per_gpu_hour: float | None = Field(None, ge=0)
    num_gpus: int = Field(1, ge=1)
    usd_per_host_hour: float | None = Field(None, ge=0)  # on CPU, wins over usd_per_gpu_hour if set
    window_seconds: float = Field(300.0, gt=0)  # the window of the recent-cost gauges


class SchedulerSettings(BaseModel):
    """Batching policy and window (engine/scheduler.py, engine/batch_window.py), as ``EngineConfig`` fields."""

    model_config = ConfigDict(extra="forbid")

    # "static" admits a new batch only when the previous one has finished: a baseline, not for serving.
    batching: Literal["continuous", "static"] = "continuous"
    max_batch_wait_ms: float = Field(20.0, ge=0)
    adaptive_batch_wait: bool = True


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LEANSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
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
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        # The YAML path is itself a setting: from the flag (init kwargs) or the environment.
        path = getattr(init_settings, "init_kwargs", {}).get("config") or os.environ.get("LEANSERVE_CONFIG")
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
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
