"""Quality gate for a quantized model: held-out perplexity, agreement with a baseline, weight memory.

Perplexity is measured on the *last* ``eval_fraction`` of each text file: calibration reads the first
part of the same file, so the two never overlap. Tokens are cut into non-overlapping windows (each
scored with its own causal context), spread evenly over the region and capped at ``max_tokens`` so the
135M model runs in a minute or two on CPU. Against a baseline we also report greedy top-1 agreement and
the mean KL(baseline || model) of the next-token distributions on exactly the same positions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from leanserve.model.llama import LlamaForCausalLM
from leanserve.model.loader import load_model
from leanserve.quant.awq import dense_logits, text_region, token_windows


@dataclass
class WeightMemory:
    total_bytes: int  # every parameter and buffer
    linear_bytes: int  # the decoder's linears as held in memory (int4 + scales, or float)
    linear_fp16_bytes: int  # the same linears at 2 bytes per weight, the yardstick for int4

    @property
    def linear_ratio_vs_fp16(self) -> float:
        return self.linear_bytes / self.linear_fp16_bytes


def weight_memory(model: nn.Module) -> WeightMemory:
    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def packed_bytes(module: nn.Module) -> int:
        # A float Linear served from oneDNN's packed layout keeps it as a plain attribute (no buffer).
        packed = getattr(module, "packed", None)
        is_buffer = any(packed is b for b in module.buffers(recurse=False))
        return nbytes([packed]) if isinstance(packed, torch.Tensor) and not is_buffer else 0

    lm_head = getattr(model, "packed_lm_head", None)  # a tied model's packed copy is memory too
    total = nbytes([*model.parameters(), *model.buffers()]) + sum(packed_bytes(m) for m in model.modules())
    total += nbytes([lm_head]) if isinstance(lm_head, torch.Tensor) else 0
    total += nbytes(getattr(model, "int8_lm_head", None) or [])  # a quantized model's int8 head copy
    linear = fp16 = 0
    for module in model.modules():
        if hasattr(module, "load_shard"):  # our fused linears, float or int4
            linear += nbytes([*module.parameters(recurse=False), *module.buffers(recurse=False)])
            linear += packed_bytes(module)
            fp16 += 2 * module.in_features * module.out_features
    return WeightMemory(total, linear, fp16)


@dataclass
class DatasetResult:
    name: str
    tokens: int  # predicted tokens scored
    ppl: float
    baseline_ppl: float | None = None
    ppl_increase_pct: float | None = None
    top1_agreement: float | None = None
    mean_kl: float | None = None


@dataclass
class EvalResult:
    model: str
    baseline: str | None
    memory: WeightMemory
    baseline_memory: WeightMemory | None
    datasets: list[DatasetResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        out = {
            "model": self.model,
            "baseline": self.baseline,
            "weight_bytes": self.memory.total_bytes,
            "linear_bytes": self.memory.linear_bytes,
            "linear_bytes_ratio_vs_fp16": round(self.memory.linear_ratio_vs_fp16, 4),
            "baseline_weight_bytes": self.baseline_memory.total_bytes if self.baseline_memory else None,
            "datasets": {d.name: {k: v for k, v in asdict(d).items() if k != "name"} for d in self.datasets},
            "seconds": round(self.seconds, 1),
        }
        return json.dumps(out)


def eval_windows(tokenizer, path: Path, max_tokens: int, window: int, eval_fraction: float) -> torch.Tensor:
    ids = tokenizer(text_region(path, 1.0 - eval_fraction, 1.0), add_special_tokens=False, verbose=False)["input_ids"]
    return token_windows(ids, max(1, max_tokens // window), window)


@torch.no_grad()
def score(
    model: LlamaForCausalLM, windows: torch.Tensor, baseline: LlamaForCausalLM | None, device: torch.device
) -> tuple[float, int, float | None, float | None, float | None]:
    """(nll sum, tokens, baseline nll sum, top-1 agreements, KL sum) over all windows."""
    nll = base_nll = agree = kl = 0.0
    count = 0
    for row in windows:
        ids = row.unsqueeze(0).to(device)
        targets = ids[0, 1:]
        logp = F.log_softmax(dense_logits(model, ids)[0, :-1], dim=-1)
        nll += -logp.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
        if baseline is not None:
            base_logp = F.log_softmax(dense_logits(baseline, ids)[0, :-1], dim=-1)
            base_nll += -base_logp.gather(1, targets[:, None]).sum().item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
            kl += (base_logp.exp() * (base_logp - logp)).sum().item()
    if baseline is None:
        return nll, count, None, None, None
    return nll, count, base_nll, agree, kl


def evaluate(
    model_path: str | Path,
    data_files: list[Path],
    baseline_path: str | Path | None = None,
    max_tokens: int = 4096,
    window: int = 512,
    eval_fraction: float = 0.2,
    device: str | torch.device = "cpu",
    cpu_matmul_dtype: torch.dtype = torch.float32,
) -> EvalResult:
    """``cpu_matmul_dtype``: the evaluated model's decoder linears on the CPU (bf16: what the server's
    ``engine.cpu_matmul_dtype=auto`` runs on CPUs with bf16 instructions); the baseline is exact fp32."""
    start = time.perf_counter()
    device = torch.device(device)
    dtype = torch.float32  # quality is judged against fp32 on every device
    # As served: oneDNN-packed weights on the CPU, in cpu_matmul_dtype.
    model = load_model(model_path, device, dtype, cpu_matmul_dtype=cpu_matmul_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    baseline = load_model(baseline_path, device, dtype) if baseline_path is not None else None
    result = EvalResult(
        str(model_path),
        None if baseline_path is None else str(baseline_path),
        weight_memory(model),
        weight_memory(baseline) if baseline is not None else None,
    )
    for path in data_files:
        windows = eval_windows(tokenizer, Path(path), max_tokens, window, eval_fraction)
        nll, count, base_nll, agree, kl = score(model, windows, baseline, device)
        d = DatasetResult(Path(path).stem, count, math.exp(nll / count))
        if base_nll is not None:
            d.baseline_ppl = math.exp(base_nll / count)
            d.ppl_increase_pct = 100.0 * (d.ppl / d.baseline_ppl - 1.0)
            d.top1_agreement = agree / count
            d.mean_kl = kl / count
        result.datasets.append(d)
    result.seconds = time.perf_counter() - start
    return result


def _cell(value: float | None, width: int, spec: str) -> str:
    """A right-aligned column; a missing value (no baseline) is a dash padded to the same width."""
    return ("-" if value is None else format(value, spec)).rjust(width)


def format_table(result: EvalResult) -> str:
    mb = lambda b: f"{b / 2**20:.1f} MiB"
    lines = [f"model:    {result.model}  ({mb(result.memory.total_bytes)} weights, linears "
             f"{mb(result.memory.linear_bytes)} = {100 * result.memory.linear_ratio_vs_fp16:.1f}% of fp16)"]
    if result.baseline is not None and result.baseline_memory is not None:
        lines.append(f"baseline: {result.baseline}  ({mb(result.baseline_memory.total_bytes)} weights)")
    header = f"{'data':<24}{'tokens':>8}{'ppl':>10}{'base ppl':>10}{'Δppl %':>9}{'top-1 agr':>11}{'mean KL':>10}"
    lines += [header, "-" * len(header)]
    for d in result.datasets:
        lines.append(
            f"{d.name:<24}{d.tokens:>8}{d.ppl:>10.3f}{_cell(d.baseline_ppl, 10, '.3f')}"
            f"{_cell(d.ppl_increase_pct, 9, '+.2f')}{_cell(d.top1_agreement, 11, '.3f')}{_cell(d.mean_kl, 10, '.4f')}"
        )
    lines.append(f"({result.seconds:.0f} s)")
    return "\n".join(lines)


def check_gate(result: EvalResult, max_increase_pct: float) -> str | None:
    """None when the first (held-out, in-domain) dataset's perplexity rose by at most the threshold."""
    primary = result.datasets[0] if result.datasets else None
    if primary is None or primary.ppl_increase_pct is None:
        return None
    if primary.ppl_increase_pct > max_increase_pct:
        return (
            f"quality gate failed: perplexity on {primary.name} rose {primary.ppl_increase_pct:+.2f}% "
            f"({primary.baseline_ppl:.3f} -> {primary.ppl:.3f}), above the {max_increase_pct:g}% limit "
            "(--max-ppl-increase); pass --force to keep the checkpoint anyway"
        )
    return None
