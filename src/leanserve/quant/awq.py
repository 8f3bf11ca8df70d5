"""AWQ (activation-aware weight quantization, Lin et al. 2023) for leanserve's Llama-family models.

Per decoder layer, on calibration text:

1. run the layer (our own modules; a dense causal forward instead of the paged one) and keep the input
   of every linear;
2. for each linear group, search per-input-channel scales ``s = mean|x|^alpha`` (alpha on a grid in
   [0, 1)) that minimise the output error of the block when its weights are int4-rounded as ``Q(W s)/s``;
   fold ``1/s`` into the op before (RMSNorm weight or the previous linear's rows) and ``s`` into ``W``:
   input_layernorm -> qkv, v -> o (with GQA, one scale per kv channel shared by its q heads),
   post_attention_layernorm -> gate_up, up -> down;
3. per (output row, group), search how far to shrink each end of the clipping range (q and k are left
   alone: the softmax amplifies their errors);
4. round to int4 and pack in AutoAWQ's GEMM format.

Layer inputs come from the float model (as AutoAWQ does), one decoder layer at a time, so memory holds
the float model plus one layer's activations. ``method="rtn"`` skips 2 and 3: plain round-to-nearest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from leanserve.kernels import reference
from leanserve.model.layers import RotaryEmbedding
from leanserve.model.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from leanserve.quant.awq_format import QuantizedWeight, fake_quantize, fake_quantize_groups, quantize_weight

logger = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]


# ---- a dense forward through our model's modules ---------------------------------------------------
# Calibration and perplexity run whole sequences at once; the paged attention of the serving path adds
# nothing there, so attention here is plain causal SDPA over the same q/k/v/o modules and rotary table.


def attention_forward(
    attn: LlamaAttention, rotary: RotaryEmbedding, x: torch.Tensor, capture: Features | None = None
) -> torch.Tensor:
    """Self-attention of ``x [B, S, hidden]`` (already normed), causal within each row."""
    b, s, _ = x.shape
    q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    positions = torch.arange(s, device=x.device).repeat(b)
    q, k = reference.apply_rotary(
        q.reshape(b * s, attn.num_heads, attn.head_dim),
        k.reshape(b * s, attn.num_kv_heads, attn.head_dim),
        positions,
        rotary.cos,
        rotary.sin,
    )
    q = q.view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = v.view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    rep = attn.num_heads // attn.num_kv_heads
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(b, s, attn.q_size)
    if capture is not None:
        capture["o"] = out
    return attn.o_proj(out)


def mlp_forward(layer: LlamaDecoderLayer, x: torch.Tensor, capture: Features | None = None) -> torch.Tensor:
    mlp = layer.mlp
    gate, up = mlp.gate_up_proj(x).split(mlp.intermediate_size, dim=-1)
    act = F.silu(gate) * up
    if capture is not None:
        capture["down"] = act
    return mlp.down_proj(act)


def layer_forward(
    layer: LlamaDecoderLayer, rotary: RotaryEmbedding, x: torch.Tensor, capture: Features | None = None
) -> torch.Tensor:
    """One decoder layer on ``x [B, S, hidden]``; ``capture`` receives every linear's input."""
    h = layer.input_layernorm(x)
    if capture is not None:
        capture["qkv"] = h
    x = x + attention_forward(layer.self_attn, rotary, h, capture)
    h = layer.post_attention_layernorm(x)
    if capture is not None:
        capture["gate_up"] = h
    return x + mlp_forward(layer, h, capture)


@torch.no_grad()
def dense_logits(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, S, vocab]`` (fp32) for token rows ``[B, S]``, every position causal from 0."""
    x = model.model.embed_tokens(input_ids)
    for layer in model.model.layers:
        x = layer_forward(layer, model.rotary, x)
    return model.compute_logits(model.model.norm(x))


# ---- calibration data ------------------------------------------------------------------------------


def text_region(path: Path, start: float, end: float) -> str:
    """Characters ``[start, end)`` (fractions of the file) of a UTF-8 text file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return text[int(len(text) * start) : int(len(text) * end)]


class TextTooShort(ValueError):
    """The text holds fewer tokens than one window needs; callers name the file and the flag."""

    def __init__(self, tokens: int, needed: int) -> None:
        super().__init__(f"the text has {tokens} tokens, fewer than one {needed}-token window")
        self.tokens = tokens
        self.needed = needed


def token_windows(ids: list[int], num: int, seq_len: int) -> torch.Tensor:
    """``num`` non-overlapping windows of ``seq_len`` tokens spread evenly over ``ids``."""
    available = len(ids) // seq_len
    if available == 0:
        raise TextTooShort(len(ids), seq_len)
    num = min(num, available)
    starts = [int(i * available / num) * seq_len for i in range(num)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


def calibration_from_text(tokenizer, path: Path, samples: int, seq_len: int, end: float = 0.8) -> torch.Tensor:
    """Calibration windows from the first ``end`` of a text file (the rest is left for evaluation)."""
    ids = tokenizer(text_region(path, 0.0, end), add_special_tokens=False, verbose=False)["input_ids"]
    return token_windows(ids, samples, seq_len)


def self_generated_calibration(model_dir: Path, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Data-free fallback: the model writes its own calibration text.

    Each sample starts from BOS plus one random vocabulary token (for diversity, as in LLM-QAT's
    data-free distillation) and is continued by sampling at temperature 1 (top-p 0.95) through our
    engine. The activations then follow the model's own distribution rather than a real corpus, which
    works but is usually a little worse than real in-domain text.
    """
    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine
    from leanserve.model.config import ModelConfig
    from leanserve.sampling_params import SamplingParams

    config = ModelConfig.from_pretrained(model_dir)
    kv_bytes = config.kv_bytes_per_token(4) * (samples + 1) * (seq_len + 32)
    engine = LLMEngine(
        EngineConfig(model=str(model_dir), kv_cache_memory=kv_bytes, max_num_seqs=samples, seed=seed)
    )
    gen = torch.Generator().manual_seed(seed)
    start = config.bos_token_id if config.bos_token_id is not None else 0
    rows: dict[str, list[int]] = {}
    for i in range(samples):
        first = int(torch.randint(0, config.vocab_size, (1,), generator=gen))
        prompt = [start, first]
        params = SamplingParams(
            max_tokens=seq_len - len(prompt), temperature=1.0, top_p=0.95, ignore_eos=True, seed=seed + i
        )
        engine.add_request(str(i), prompt, params)
        rows[str(i)] = list(prompt)
    bar = tqdm(total=samples * seq_len, desc="self-generating calibration text", unit="tok")
    while engine.has_unfinished_requests():
        for out in engine.step():
            rows[out.request_id].extend(out.new_token_ids)
            bar.update(len(out.new_token_ids))
    bar.close()
    return torch.tensor([rows[str(i)][:seq_len] for i in range(samples)], dtype=torch.long)


# ---- the search ------------------------------------------------------------------------------------


@dataclass
class AWQSettings:
    group_size: int = 128
    method: str = "awq"  # "awq" or "rtn"
    n_grid: int = 20  # alpha in {0, 1/n, ..., (n-1)/n}; alpha = 0 is plain RTN, so AWQ never loses to it
    search_tokens: int = 2048  # tokens whose block output error scores a candidate scale
    clip_grid: int = 20
    max_shrink: float = 0.5  # clip to no less than half the group's absolute max
    batch_size: int = 4  # sequences per forward while collecting layer inputs
    # Next layer's inputs from the float layer ("float", AutoAWQ) or from the int4 one ("quantized").
    propagate: str = "quantized"


def _first_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[:n]


@torch.no_grad()
def search_scale(
    weights: list[torch.Tensor],
    x_mean: torch.Tensor,
    block: Callable[[], torch.Tensor],
    reference: torch.Tensor,
    settings: AWQSettings,
    expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
) -> torch.Tensor:
    """Grid-search ``alpha`` for ``s = x_mean ** alpha``; ``block()`` recomputes the block's output.

    ``weights`` are the ``nn.Linear`` weights whose input channels the scales ``expand(s)`` multiply;
    they are fake-quantized in place per candidate and restored at the end.
    """
    originals = [w.clone() for w in weights]
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    for i in range(settings.n_grid):
        s = x_mean.pow(i / settings.n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (only their ratios matter)
        full = expand(s)
        for w, orig in zip(weights, originals, strict=True):
            w.copy_(fake_quantize(orig * full, settings.group_size) / full)
        loss = (block() - reference).float().pow(2).mean().item()
        if loss < best_loss:
            best_loss, best = loss, s.clone()
    for w, orig in zip(weights, originals, strict=True):
        w.copy_(orig)
    return best


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input group, the second moment ``E[x_g x_g^T]`` ``[groups, g, g]`` of the rows of ``x [T, in]``."""
    t, inp = x.shape
    xg = x.float().reshape(t, inp // group_size, group_size).transpose(0, 1)  # [groups, T, g]
    return torch.bmm(xg.transpose(1, 2), xg) / t


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, settings: AWQSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range ``(lo, hi)``, each ``[out, groups, 1]``, per (output row, group) of ``w [out, in]``.

    A group's contribution to the output error is ``d^T E[x x^T] d`` for its weight error ``d``, so the
    search needs only the per-group second moments (exact for all calibration tokens, and far cheaper
    than replaying tokens). AutoAWQ shrinks the range symmetrically; with a zero point the two ends
    matter separately, so after the symmetric pass each end is refined on its own.
    """
    g = settings.group_size
    out, inp = w.shape
    wg = w.float().reshape(out, inp // g, g).transpose(0, 1)  # [groups, o, g]
    wmax, wmin = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)

    def error(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        d = fake_quantize_groups(torch.maximum(torch.minimum(wg, hi), lo)) - wg
        return (torch.bmm(d, gram) * d).sum(-1, keepdim=True)  # [groups, o, 1]

    steps = int(settings.max_shrink * settings.clip_grid)
    shrinks = [1 - i / settings.clip_grid for i in range(steps)]
    lo, hi = wmin, wmax
    best = error(lo, hi)
    passes = (
        lambda f: (wmin * f, wmax * f),  # symmetric, as AutoAWQ
        lambda f: (lo, wmax * f),  # then the top end alone
        lambda f: (wmin * f, hi),  # then the bottom end alone
    )
    for make in passes:  # the lambdas read lo/hi as left by the previous pass
        for f in shrinks[1:]:
            cand_lo, cand_hi = make(f)
            err = error(cand_lo, cand_hi)
            better = err < best
            best = torch.where(better, err, best)
            lo = torch.where(better, cand_lo, lo)
            hi = torch.where(better, cand_hi, hi)
    return lo.transpose(0, 1), hi.transpose(0, 1)


def apply_clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int) -> None:
    out, inp = w.shape
    grouped = w.view(out, inp // group_size, group_size)
    grouped.copy_(torch.maximum(torch.minimum(grouped, hi), lo))


@torch.no_grad()
def awq_layer(layer: LlamaDecoderLayer, rotary: RotaryEmbedding, feats: Features, settings: AWQSettings) -> None:
    """Search and fold scales, then clip, for one layer whose linear inputs are ``feats``."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    seq_len = feats["qkv"].shape[1]
    n_seqs = max(1, settings.search_tokens // seq_len)
    v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
    inter = mlp.intermediate_size
    up_rows = slice(inter, 2 * inter)

    def mean_abs(x: torch.Tensor) -> torch.Tensor:
        return x.abs().reshape(-1, x.shape[-1]).float().mean(0)

    # input_layernorm -> qkv, judged on the attention output (o_proj still float).
    x_attn = feats["qkv"][:n_seqs]
    s_qkv = search_scale(
        [qkv.weight], mean_abs(feats["qkv"]),
        lambda: attention_forward(attn, rotary, x_attn),
        attention_forward(attn, rotary, x_attn), settings,
    )
    # post_attention_layernorm -> gate_up, judged on the MLP output.
    x_mlp = _first_tokens(feats["gate_up"], settings.search_tokens)
    s_mlp = search_scale(
        [gate_up.weight], mean_abs(feats["gate_up"]),
        lambda: mlp_forward(layer, x_mlp), mlp_forward(layer, x_mlp), settings,
    )
    # up -> down, judged on down's output.
    x_down = _first_tokens(feats["down"], settings.search_tokens)
    s_down = search_scale(
        [down.weight], mean_abs(feats["down"]), lambda: down(x_down), down(x_down), settings
    )
    # v -> o. o's input channel (head h, dim d) reads v's row (kv head of h, d): with GQA the q heads
    # of one kv group must share a scale, so search per kv row and expand to o's channels.
    kvh, rep, d = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    expand = lambda s: s.view(kvh, 1, d).expand(kvh, rep, d).reshape(kvh * rep * d)
    x_o = _first_tokens(feats["o"], settings.search_tokens)
    o_mean = mean_abs(feats["o"]).view(kvh, rep, d).mean(1).reshape(kvh * d)
    s_v = search_scale([o.weight], o_mean, lambda: o(x_o), o(x_o), settings, expand)
    s_o = expand(s_v)

    # Fold: the op before divides by s, the linear multiplies its input channels by s.
    layer.input_layernorm.weight.div_(s_qkv)
    qkv.weight.mul_(s_qkv)
    feats["qkv"] = feats["qkv"] / s_qkv
    layer.post_attention_layernorm.weight.div_(s_mlp)
    gate_up.weight.mul_(s_mlp)
    feats["gate_up"] = feats["gate_up"] / s_mlp
    gate_up.weight[up_rows].div_(s_down.unsqueeze(1))
    if gate_up.bias is not None:
        gate_up.bias[up_rows].div_(s_down)
    down.weight.mul_(s_down)
    feats["down"] = feats["down"] / s_down
    qkv.weight[v_rows].div_(s_v.unsqueeze(1))
    if qkv.bias is not None:
        qkv.bias[v_rows].div_(s_v)
    o.weight.mul_(s_o)
    feats["o"] = feats["o"] / s_o

    # Clip (not q/k: attention logits are too sensitive to a shrunk range).
    g = settings.group_size
    for weight, x in (
        (qkv.weight[v_rows], feats["qkv"]),
        (o.weight, feats["o"]),
        (gate_up.weight, feats["gate_up"]),
        (down.weight, feats["down"]),
    ):
        lo, hi = search_clip(weight, group_gram(x.reshape(-1, x.shape[-1]), g), settings)
        apply_clip(weight, lo, hi, g)


# ---- the driver ------------------------------------------------------------------------------------

_SHARD_NAMES = {
    "self_attn.qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
    "self_attn.o_proj": ("self_attn", ["o_proj"]),
    "mlp.gate_up_proj": ("mlp", ["gate_proj", "up_proj"]),
    "mlp.down_proj": ("mlp", ["down_proj"]),
}


def _quantized_tensors(prefix: str, layer: LlamaDecoderLayer, group_size: int) -> dict[str, torch.Tensor]:
    """AWQ checkpoint tensors (HF names, unfused) for the layer's linears as they are now."""
    modules = dict(layer.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for fused, (parent, names) in _SHARD_NAMES.items():
        linear = modules[fused]
        qw: QuantizedWeight = quantize_weight(linear.weight.detach().float().cpu(), group_size)
        start = 0
        for name, size in zip(names, linear.shard_sizes, strict=True):
            rows = slice(start, start + size)
            part = QuantizedWeight(qw.q[rows], qw.zeros[rows], qw.scales[rows], group_size)
            base = f"{prefix}.{parent}.{name}"
            for key, t in part.to_awq().items():
                tensors[f"{base}.{key}"] = t
            if linear.bias is not None:
                tensors[f"{base}.bias"] = linear.bias[rows].detach().cpu()
            start += size
    return tensors


@torch.no_grad()
def quantize_model(
    model: LlamaForCausalLM, calib_ids: torch.Tensor | None, settings: AWQSettings, progress: bool = True
) -> dict[str, torch.Tensor]:
    """AWQ- (or RTN-) quantize ``model`` layer by layer; return every checkpoint tensor (HF names).

    ``model`` is modified in place (scales folded, weights clipped) and should be discarded afterwards.
    """
    device = next(model.parameters()).device
    cfg = model.config
    for dim in (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size):
        if dim % settings.group_size:
            raise ValueError(
                f"group size {settings.group_size} does not divide the linear input size {dim}; AWQ "
                "needs whole groups (try --group-size 64 or 32)"
            )
    for layer in model.model.layers:
        if any(m.weight.numel() == 0 for m in layer.modules() if hasattr(m, "load_shard")):
            raise ValueError("the model's weights are packed for serving: load it with pack_weights=False")
    tensors: dict[str, torch.Tensor] = {}
    x = None
    if settings.method == "awq":
        if calib_ids is None:
            raise ValueError("AWQ needs calibration tokens")
        x = model.model.embed_tokens(calib_ids.to(device))
    bar = tqdm(model.model.layers, desc=f"{settings.method.upper()} int4", unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        if x is not None:
            feats: dict[str, list[torch.Tensor]] = {"qkv": [], "o": [], "gate_up": [], "down": []}
            outs = []
            for b in range(0, x.shape[0], settings.batch_size):
                capture: Features = {}
                outs.append(layer_forward(layer, model.rotary, x[b : b + settings.batch_size], capture))
                for key, value in capture.items():
                    feats[key].append(value)
            joined = {key: torch.cat(values, 0) for key, values in feats.items()}
            awq_layer(layer, model.rotary, joined, settings)
            del joined, feats
        tensors.update(_quantized_tensors(f"model.layers.{i}", layer, settings.group_size))
        if x is not None and settings.propagate == "quantized":
            # The next layer calibrates on what it will see when served: this layer's int4 output.
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj):
                linear.weight.copy_(fake_quantize(linear.weight, settings.group_size))
            outs = [layer_forward(layer, model.rotary, x[b : b + settings.batch_size])
                    for b in range(0, x.shape[0], settings.batch_size)]
        if x is not None:
            x = torch.cat(outs, 0)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = getattr(layer, norm).weight.detach().cpu()
    tensors["model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().cpu()
    tensors["model.norm.weight"] = model.model.norm.weight.detach().cpu()
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight.detach().cpu()
    return tensors
