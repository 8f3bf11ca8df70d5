"""The int8 LM head of quantized models: accuracy against the fp32 head, row gating, when the loader adds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanserve.model.layers import cpu_packing_available, int8_mm_supported, packed_linear
from leanserve.model.llama import INT8_HEAD_CANDIDATES, INT8_HEAD_MAX_ROWS
from leanserve.model.loader import load_model
from tests.conftest import build_tiny_checkpoint, needs_onednn_bf16

CPU = torch.device("cpu")
VOCAB = 2048
# Stated tolerance: every int8 logit within 2% of its row's largest fp32 logit (measured: at most 1.0%).
REL_TOL = 0.02

pytestmark = pytest.mark.skipif(
    not (int8_mm_supported(64) and cpu_packing_available()), reason="needs torch's int8 matmul and oneDNN"
)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("untied"), "llama", vocab_size=VOCAB)


def _hidden(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)) * 2


def _int8_logits_in_small_calls(model, h: torch.Tensor) -> torch.Tensor:
    step = INT8_HEAD_MAX_ROWS
    return torch.cat([model.compute_logits(h[i : i + step]) for i in range(0, len(h), step)])


def test_tied_int8_head_is_close_and_greedy_exact(tied_dir: Path) -> None:
    model = load_model(tied_dir, CPU, torch.float32)
    assert model.int8_lm_head is None  # an fp32 checkpoint keeps the exact head
    assert model.quantize_lm_head_int8()
    h = _hidden(512, 0)
    ref = F.linear(h, model.lm_head_weight())
    got = _int8_logits_in_small_calls(model, h)
    err = (got - ref).abs()
    assert (err.amax(dim=-1) <= REL_TOL * ref.abs().amax(dim=-1)).all()
    assert err.max() > 1e-4  # the int8 weight really served these rows
    # The best candidates are re-scored in fp32 from the embedding table: top-5 values and greedy choice
    # are the fp32 head's (a tie closer than fp32 rounding is the only way to differ).
    top = ref.topk(5, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), ref.gather(-1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_untied_int8_head_agrees_except_near_ties(untied_dir: Path) -> None:
    """Packing drops an untied head's plain weight, so nothing re-scores: plain int8 logits."""
    model = load_model(untied_dir, CPU, torch.float32, pack_weights=False)
    assert model.quantize_lm_head_int8() and model.pack_for_cpu()  # the loader's order
    assert model.lm_head.weight.numel() == 0  # no plain fp32 copy kept beside packed + int8
    h = _hidden(512, 1)
    ref = packed_linear(h, model.packed_lm_head, None)
    got = _int8_logits_in_small_calls(model, h)
    row_tol = REL_TOL * ref.abs().amax(dim=-1)
    assert ((got - ref).abs().amax(dim=-1) <= row_tol).all()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * row_tol  # no error within the tolerance can swap these two
    assert clear.sum() >= len(h) // 2
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_rows_above_threshold_take_the_fp32_head(tied_dir: Path) -> None:
    model = load_model(tied_dir, CPU, torch.float32)
    assert model.quantize_lm_head_int8()
    assert INT8_HEAD_CANDIDATES < VOCAB
    h = _hidden(2 * INT8_HEAD_MAX_ROWS + 2, 2)
    small, large = h[:INT8_HEAD_MAX_ROWS], h[: INT8_HEAD_MAX_ROWS + 1]
    assert torch.equal(model.compute_logits(large), packed_linear(large, model.packed_lm_head, None))
    assert not torch.equal(model.compute_logits(small), packed_linear(small, model.packed_lm_head, None))
    # Rows are counted over all leading dims: [3, 6] is 18 rows (fp32), [2, 4] is 8 (int8).
    grid = h.view(3, 6, 64)
    assert torch.equal(model.compute_logits(grid), packed_linear(grid, model.packed_lm_head, None))
    sub = h[:8].view(2, 4, 64)
    assert torch.equal(model.compute_logits(sub), model.compute_logits(h[:8]).view(2, 4, VOCAB))
    model.int8_lm_head = None
    assert torch.equal(model.compute_logits(small), packed_linear(small, model.packed_lm_head, None))


def _rtn_checkpoint(src: Path, out: Path) -> Path:
    from leanserve.quant.awq import AWQSettings, quantize_model
    from leanserve.quant.awq_format import write_checkpoint

    model = load_model(src, CPU, torch.float32, pack_weights=False)
    write_checkpoint(out, src, quantize_model(model, None, AWQSettings(group_size=32, method="rtn"), False), 32)
    return out


def test_loader_adds_int8_head_to_quantized_checkpoints_only(tied_dir: Path, tmp_path: Path) -> None:
    quantized = _rtn_checkpoint(tied_dir, tmp_path / "rtn")
    model = load_model(quantized, CPU, torch.float32)
    q, scales = model.int8_lm_head
    assert q.dtype == torch.int8 and q.shape == (VOCAB, 64) and scales.dtype == torch.bfloat16
    assert load_model(quantized, CPU, torch.float32, pack_weights=False).int8_lm_head is None
    assert load_model(tied_dir, CPU, torch.float32).int8_lm_head is None


def test_quantized_engine_greedy_output_unchanged_by_int8_head(tied_dir: Path, tmp_path: Path) -> None:
    """Batch-1 decode goes through the int8 head; greedy tokens must be those of the fp32 head."""
    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine
    from leanserve.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(_rtn_checkpoint(tied_dir, tmp_path / "rtn")),
                                    kv_cache_memory=1 << 22, device="cpu", num_threads=1))
    assert engine.model.int8_lm_head is not None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 11, 30)]

    def greedy(run: str) -> list[list[int]]:
        tokens: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            tokens[f"{run}-{i}"] = []
            engine.add_request(f"{run}-{i}", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        return list(tokens.values())

    with_int8 = greedy("int8")
    engine.model.int8_lm_head = None
    assert greedy("fp32") == with_int8


@needs_onednn_bf16
@pytest.mark.parametrize("tied", [True, False])
def test_bf16_matmul_weights_leave_the_lm_head_fp32(tied: bool, tied_dir: Path, untied_dir: Path) -> None:
    """``cpu_matmul_dtype=bf16`` packs every decoder linear in bf16, and adds the int8 head for up to
    ``INT8_HEAD_MAX_ROWS`` rows; larger calls get the fp32 head's logits bit for bit, and the model's
    logits stay within bf16's error of the fp32 model's."""
    from leanserve.model.layers import Linear
    from leanserve.quant.awq import dense_logits

    folder = tied_dir if tied else untied_dir
    exact = load_model(folder, CPU, torch.float32)
    model = load_model(folder, CPU, torch.float32, cpu_matmul_dtype=torch.bfloat16)
    linears = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None and m.packed.dtype == torch.bfloat16 for m in linears)
    assert model.packed_lm_head is not None and model.packed_lm_head.dtype == torch.float32
    # Approximate already, it takes the int8 head for decode-sized calls; exact fp32 never does.
    assert model.int8_lm_head is not None and exact.int8_lm_head is None
    h = _hidden(INT8_HEAD_MAX_ROWS + 3, 3)
    assert torch.equal(model.compute_logits(h), exact.compute_logits(h))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got, want = dense_logits(model, ids), dense_logits(exact, ids)
    assert not torch.equal(got, want)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
