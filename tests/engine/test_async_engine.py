from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from leanserve.engine.async_engine import AsyncEngine
from leanserve.engine.config import EngineConfig
from leanserve.engine.llm_engine import LLMEngine, RequestError
from leanserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm_engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_memory=1 << 20, max_model_len=256))


def test_concurrent_streams_complete_and_early_exit_aborts(llm_engine: LLMEngine) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm_engine)
        engine.start()

        async def consume(i: int, leave_after: int | None) -> list[int]:
            tokens: list[int] = []
            params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
            async for out in engine.generate(f"r{i}", [3 + i, 4, 5, 6, 7], params):
                tokens += out.new_token_ids
                if leave_after is not None and len(tokens) >= leave_after:
                    break
            return tokens

        results = await asyncio.gather(*(consume(i, 3 if i % 3 == 0 else None) for i in range(12)))
        for i, tokens in enumerate(results):
            assert len(tokens) == (3 if i % 3 == 0 else 20)
        for _ in range(50):  # aborts are applied by the engine thread between steps
            if llm_engine.block_manager.num_used_blocks == 0:
                break
            await asyncio.sleep(0.02)
        assert llm_engine.block_manager.num_used_blocks == 0
        assert engine.num_unfinished == 0 and not llm_engine.has_unfinished_requests()
        await engine.shutdown()
        assert not engine.is_alive

    asyncio.run(main())


def test_bad_request_raises_before_streaming(llm_engine: LLMEngine) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm_engine)
        engine.start()
        with pytest.raises(RequestError):
            async for _ in engine.generate("too-long", [5] * 300, SamplingParams()):
                pass
        assert engine.num_unfinished == 0
        await engine.shutdown()

    asyncio.run(main())


def test_event_loop_stays_responsive_while_engine_works(llm_engine: LLMEngine) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm_engine)
        engine.start()
        params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

        async def drain(i: int) -> None:
            async for _ in engine.generate(f"busy{i}", list(range(3, 100)), params):
                pass

        work = asyncio.gather(*(drain(i) for i in range(8)))
        worst = 0.0
        while not work.done():
            start = time.perf_counter()
            await asyncio.sleep(0)
            worst = max(worst, time.perf_counter() - start)
            await asyncio.sleep(0.005)
        await work
        assert worst < 0.1
        await engine.shutdown()

    asyncio.run(main())


def test_step_listeners_see_aborts(llm_engine: LLMEngine) -> None:
    seen: list[str | None] = []

    async def main() -> None:
        engine = AsyncEngine(llm_engine)
        engine.step_listeners.append(lambda stats, outs, _: seen.extend(o.finish_reason for o in outs if o.finished))
        engine.start()
        params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate("leaver", [3, 4, 5], params):
            break
        for _ in range(50):
            if "abort" in seen:
                break
            await asyncio.sleep(0.02)
        await engine.shutdown()

    asyncio.run(main())
    assert seen == ["abort"]
