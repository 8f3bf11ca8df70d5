"""Test helpers: a tiny random model, a leanserve app around it, a load generator, scrape parsing.

The live server is ``leanserve.api.server.create_app`` when it is importable; without it (the API
package not there), ``make_app`` builds a minimal FastAPI app: ``setup_metrics`` plus
``POST /generate`` (prompt token ids in, one NDJSON line per engine output out) driving the real
``AsyncEngine``. The metrics path is the production one either way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from leanserve.engine.llm_engine import RequestOutput, StepStats
from leanserve.metrics import setup_metrics
from tests.conftest import build_tiny_checkpoint
from tests.metrics.loadgen import MODEL_NAME
from tests.server_thread import ServerThread  # noqa: F401 - re-exported for the tests here

# ---- environment ----------------------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(path: str | None, name: str, install: str) -> str:
    """The tool's path; skip when absent outside CI, fail when absent under CI."""
    if path:
        return path
    message = f"{name} is not installed ({install})"
    if in_ci():
        pytest.fail(f"{message}; CI must install it")
    pytest.skip(f"{message}; skipped because CI is unset (under CI=true this fails)")


# ---- the tiny model -------------------------------------------------------------------------------


def build_tiny_model(path: Path) -> Path:
    """A small random Llama (~3M parameters) with a 300-word word-level tokenizer (t0 BOS, t1 EOS).

    Big enough that a step takes milliseconds: with a model much faster than the HTTP stack, the
    client's latency would be mostly HTTP overhead and the latency comparison would test that.
    """
    return build_tiny_checkpoint(
        path, "llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2,
    )


# ---- a fake NVML, so GPU families are exercised on CPU-only CI --------------------------------------


class FakeNvml:
    """The handful of pynvml calls ``GpuSampler`` makes, for ``count`` made-up boards."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.initialised = False

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:  # noqa: N802
        return b"Fake GPU"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=40 + 10 * h, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=(h + 1) << 30, total=80 << 30, free=(79 - h) << 30)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        return 300_000 + h  # milliwatts


# ---- a fake engine for collector unit tests ---------------------------------------------------------


def fake_engine(device: str = "cpu") -> Any:
    bm = SimpleNamespace(num_blocks=100, num_free_blocks=75, usage=0.25, prefix_queries=10, prefix_hits=4,
                         block_size=16, enable_prefix_caching=True)
    engine = SimpleNamespace(num_running=2, num_waiting=1, block_manager=bm,
                             scheduler=SimpleNamespace(num_preemptions=3, current_batch_window_ms=5.0),
                             device=SimpleNamespace(type=device), max_model_len=512,
                             model_dir=Path("/models/tiny"))
    return SimpleNamespace(engine=engine, step_listeners=[])


def output(rid: str, n_out: int, finished: bool = False, **kw: Any) -> RequestOutput:
    fields = dict(request_id=rid, new_token_ids=[7], text_delta="", logprobs=None, finished=finished,
                  finish_reason="length" if finished else None, stop_reason=None, num_prompt_tokens=10,
                  num_output_tokens=n_out, num_cached_tokens=0, arrival_time=0.0, first_scheduled_time=0.5,
                  first_token_time=1.0)
    fields.update(kw)
    return RequestOutput(**fields)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def one_request(collector: Any) -> None:
    """r1: arrives at 0, scheduled at 0.5, tokens at 1.0, 1.2 and 1.5 (finished by length)."""
    stats = StepStats(num_seqs=1, num_prefill_tokens=10, step_seconds=0.1)
    decode = StepStats(num_seqs=1, num_decode_tokens=1, step_seconds=0.1)
    pending = collector.recorder.pending
    pending.append((1.0, stats, [output("r1", 1)]))
    pending.append((1.2, decode, [output("r1", 2)]))
    pending.append((1.5, decode, [output("r1", 3, finished=True, mean_logprob=-2.0)]))


# ---- the app under test ---------------------------------------------------------------------------


class GenerateBody(BaseModel):
    prompt_token_ids: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    ignore_eos: bool = True


def make_app(async_engine: Any, settings: Any) -> FastAPI:
    from leanserve.sampling_params import SamplingParams

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.shutdown()

    app = FastAPI(lifespan=lifespan)
    counter = iter(range(1 << 62))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(body: GenerateBody) -> StreamingResponse:
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                                ignore_eos=body.ignore_eos)
        request_id = f"req-{next(counter)}"

        async def lines() -> AsyncIterator[bytes]:
            async for out in async_engine.generate(request_id, body.prompt_token_ids, params):
                yield (json.dumps({"token_ids": out.new_token_ids, "finished": out.finished,
                                   "finish_reason": out.finish_reason}) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    setup_metrics(app, async_engine, settings)
    return app


def settings_for_test(**cost: Any) -> SimpleNamespace:
    return SimpleNamespace(
        served_model_name=MODEL_NAME,
        cost=SimpleNamespace(**{"usd_per_gpu_hour": 3.6, "num_gpus": 1, **cost}),
        progress_interval_s=1.0,
    )


# ---- scrape parsing -------------------------------------------------------------------------------


@dataclass
class Scrape:
    text: str
    families: dict[str, Any]  # family name -> prometheus_client Metric
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    @property
    def sample_names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        total, found = 0.0, False
        for (n, lbls), v in self.samples.items():
            if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()):
                total += v
                found = True
        if not found:
            raise KeyError(f"no sample {name}{labels or ''}")
        return total

    def buckets(self, family: str) -> list[tuple[float, float]]:
        """Cumulative (le, count) pairs of a histogram, summed over label sets, sorted by le."""
        acc: dict[float, float] = {}
        for (n, lbls), v in self.samples.items():
            if n == f"{family}_bucket":
                le = float(dict(lbls)["le"])
                acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())


def parse_scrape(text: str) -> Scrape:
    families, samples = {}, {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(text, families, samples)


def scrape(url: str) -> Scrape:
    resp = httpx.get(f"{url}/metrics", timeout=10)
    resp.raise_for_status()
    return parse_scrape(resp.text)


def diff_buckets(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    prior = dict(before)
    return [(le, c - prior.get(le, 0.0)) for le, c in after]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' estimate: linear interpolation inside the bucket holding the q-th observation."""
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            return lower_le + (le - lower_le) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_le, lower_count = le, count
    return buckets[-1][0]


def bucket_index(value: float, bounds: list[float]) -> int:
    """Index of the bucket (le = bounds[i]) that ``value`` falls in."""
    for i, le in enumerate(bounds):
        if value <= le:
            return i
    return len(bounds)


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
