"""The 1.1B model's four projections at decode sizes, bf16: cuBLAS against the Triton GEMV.

Run as ``python benchmarks/decode_step.py --matmul-probe``. Three tables, all from CUDA graphs so that
launch gaps do not count (serving replays graphs too):

- ``matmul_probe``: one call's share of a graph cycling through 8 weight copies (so weights come from
  HBM, not the 60 MB L2): ``F.linear`` (what the model called before), ``torch.mv``, a matmul with the
  weight stored transposed, and the GEMV with programmatic dependent launch (PDL) off and on. The 8
  calls are independent, back to back: with PDL each may start while the one before drains;
- ``gemv_sweep``: the GEMV's launch parameters (rows per program, warps, K split, and the resident-grid
  launch by programs per SM) per shape, PDL off;
- ``layer_chain``: one decoder layer's projections as a dependent chain (qkv -> o -> gate_up -> down,
  each reading the previous output), 8 layers of distinct weights per graph: us per layer and % of
  copy bandwidth for its 88 MB. This is where PDL can hide each kernel's ramp-up and tail.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gpu_timing import graph_us

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
COPIES = 8  # weight copies per graph: 8 x the largest layer (46 MB) is well past L2
ROWS = (1, 2, 4, 8)
SWEEP_ROWS = (1, 8)


def _pct(nbytes: int, us: float, bandwidth: float) -> float:
    return 100 * nbytes / us / 1e3 / bandwidth


def _gemv(config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from leanserve.kernels.gemv import gemv

    return lambda x, w: gemv(x, w, config=config)


def projections(bandwidth: float) -> list[dict]:
    from leanserve.kernels.gemv import GemvConfig

    variants: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "F.linear": F.linear,
        "gemv": _gemv(GemvConfig(pdl=False)),
        "gemv+pdl": _gemv(GemvConfig(pdl=True)),
        "persistent+pdl": _gemv(GemvConfig(pdl=True, persistent=True)),
    }
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        transposed = [w.t().contiguous() for w in weights]
        nbytes = out_f * in_f * 2
        for m in ROWS:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
            calls = {label: [lambda w=w, x=x, f=f: f(x, w) for w in weights] for label, f in variants.items()}
            if m in (1, 8):
                calls["x @ W^T stored"] = [lambda w=w, x=x: x @ w for w in transposed]
            if m == 1:
                calls["torch.mv"] = [lambda w=w, x=x: torch.mv(w, x[0]) for w in weights]
            want = F.linear(x.float(), weights[0].float())
            err = (variants["gemv"](x, weights[0]).float() - want).abs().max().item()
            for label, fns in calls.items():
                us = graph_us(fns)
                rows.append(dict(layer=name, m=m, variant=label, us=us, pct_of_copy=_pct(nbytes, us, bandwidth),
                                 **({"max_abs_err_vs_fp32": err} if label == "gemv" else {})))
                print(f"  {name:8s} {out_f}x{in_f} M={m} {label:20s} {us:7.1f} us  "
                      f"{_pct(nbytes, us, bandwidth):5.1f}% of copy")
        del weights, transposed
    return rows


def gemv_sweep(bandwidth: float) -> list[dict]:
    """Rows per program x warps (K split by the heuristic), then forced K splits at the defaults."""
    from leanserve.kernels.gemv import GemvConfig

    configs = [GemvConfig(block_n=bn, num_warps=nw, pdl=False) for bn, nw in itertools.product((4, 8, 16), (2, 4, 8))]
    configs += [GemvConfig(splits=s, pdl=False) for s in (1, 2, 4, 8)]
    # The resident grid: programs per SM x rows per program.
    configs += [GemvConfig(block_n=bn, persistent=True, programs_per_sm=p, pdl=False)
                for bn, p in itertools.product((4, 8), (1, 2, 3, 4))]
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        nbytes = out_f * in_f * 2
        for m in SWEEP_ROWS:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
            best = None
            for config in configs:
                f = _gemv(config)
                us = graph_us([lambda w=w, x=x, f=f: f(x, w) for w in weights])
                cfg = dict(block_n=config.block_n, num_warps=config.num_warps, splits=config.splits,
                           **({"persistent": True, "programs_per_sm": config.programs_per_sm}
                              if config.persistent else {}))
                rows.append(dict(layer=name, m=m, config=cfg, us=us, pct_of_copy=_pct(nbytes, us, bandwidth)))
                if best is None or us < best[0]:
                    best = (us, cfg)
            print(f"  {name:8s} M={m}: best {best[0]:6.1f} us {_pct(nbytes, best[0], bandwidth):5.1f}% of copy "
                  f"with {best[1]} (None = default)")
        del weights
    return rows


def layer_chain(bandwidth: float) -> list[dict]:
    from leanserve.kernels.gemv import GemvConfig

    layers = [{name: torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
               for name, (out_f, in_f) in SHAPES.items()} for _ in range(COPIES)]
    nbytes = sum(out_f * in_f * 2 for out_f, in_f in SHAPES.values())
    variants = {"F.linear": F.linear, "gemv": _gemv(GemvConfig(pdl=False)), "gemv+pdl": _gemv(GemvConfig(pdl=True)),
                "persistent+pdl": _gemv(GemvConfig(pdl=True, persistent=True)),
                "persistent+pdl, 3 per SM": _gemv(GemvConfig(pdl=True, persistent=True, programs_per_sm=3))}
    rows = []
    for m in ROWS:
        x = torch.randn(m, SHAPES["qkv"][1], device="cuda", dtype=torch.bfloat16)

        def layer(w: dict[str, torch.Tensor], f, x=x) -> torch.Tensor:
            # Each projection reads the previous one's output (sliced to its input width), as in the model.
            h = f(x, w["qkv"])[:, : SHAPES["o"][1]]
            h = f(h, w["o"])
            h = f(h, w["gate_up"])[:, : SHAPES["down"][1]]
            return f(h, w["down"])

        for label, f in variants.items():
            us = graph_us([lambda w=w, f=f: layer(w, f) for w in layers])
            rows.append(dict(m=m, variant=label, us_per_layer=us, pct_of_copy=_pct(nbytes, us, bandwidth)))
            print(f"  layer chain M={m} {label:20s} {us:7.1f} us per layer ({nbytes / 1e6:.0f} MB)  "
                  f"{_pct(nbytes, us, bandwidth):5.1f}% of copy")
    return rows


def run(bandwidth: float, emit: Callable[[dict], None]) -> dict:
    """All three tables; each is also passed to ``emit`` as soon as it is done (a step cut short by its
    time limit keeps what it measured). The sweep, the slowest (a compile per config), goes last."""
    results = {}
    for title, key, table in (
        ("projections: one call's share of a graph over 8 weight copies", "matmul_probe", projections),
        ("one layer's projections as a dependent chain, 8 layers per graph", "layer_chain", layer_chain),
        ("GEMV launch sweep (PDL off)", "gemv_sweep", gemv_sweep),
    ):
        print(title)
        results[key] = table(bandwidth)
        emit({key: results[key]})
    return results
