"""``leanserve quantize`` and ``leanserve eval``.

The main CLI registers these with ``add_quant_subcommands(subparsers)``; ``python -m
leanserve.quant.cli`` runs them on their own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from leanserve.model.config import ModelConfig

# The shared public-domain texts live beside the repository (never copied into it).
DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
DEFAULT_CALIB = DATA_DIR / "pride_and_prejudice.txt"
DEFAULT_EVAL = [DATA_DIR / "pride_and_prejudice.txt", DATA_DIR / "shakespeare.txt"]
GROUP_SIZE_PREFERENCE = (128, 64, 32)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_group_size(requested: str, config: ModelConfig) -> int:
    """``auto``: the largest of 128/64/32 that divides every linear's input size (AWQ needs whole groups)."""
    dims = {config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size}
    if requested != "auto":
        group = int(requested)
        bad = sorted(d for d in dims if d % group)
        if bad:
            raise SystemExit(
                f"--group-size {group} does not divide the linear input sizes {bad}; AWQ needs whole "
                f"groups. Use --group-size auto (picks the largest of {GROUP_SIZE_PREFERENCE} that fits)."
            )
        return group
    for group in GROUP_SIZE_PREFERENCE:
        if all(d % group == 0 for d in dims):
            return group
    raise SystemExit(f"no group size in {GROUP_SIZE_PREFERENCE} divides the linear input sizes {sorted(dims)}")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, action="append", default=None,
                   help="held-out text file(s), scored on their last --eval-fraction; the first one gates "
                        f"(default: {', '.join(str(d) for d in DEFAULT_EVAL)})")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per data file")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="the tail of each file that is held out for evaluation (calibration reads the rest)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def add_quant_subcommands(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser("quantize", help="AWQ int4-quantize a model into an AutoAWQ-format folder")
    q.add_argument("--model", default=None, help="source HF folder or .gguf (default: the embedded model)")
    q.add_argument("--out", required=True, type=Path, help="destination folder")
    q.add_argument("--group-size", default="auto",
                   help="input channels per scale/zero (default auto: 128 if it divides every linear, else 64, 32)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq",
                   help="awq (activation-aware scales + clipping) or rtn (plain round-to-nearest, for comparison)")
    q.add_argument("--calib", type=Path, default=None,
                   help="calibration text, its first (1 - --eval-fraction) is used; without it the model "
                        "generates its own calibration text (data-free fallback)")
    q.add_argument("--samples", type=int, default=16, help="calibration sequences")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    q.add_argument("--n-grid", type=int, default=20, help="alpha grid points for the scale search")
    q.add_argument("--search-tokens", type=int, default=2048,
                   help="tokens whose block output error scores each candidate scale")
    q.add_argument("--max-ppl-increase", type=float, default=5.0,
                   help="fail when held-out perplexity rises more than this many percent")
    q.add_argument("--force", action="store_true", help="keep the checkpoint and exit 0 even if the gate fails")
    q.add_argument("--skip-eval", action="store_true", help="do not run the quality gate")
    _add_eval_options(q)
    q.set_defaults(func=run_quantize)

    e = subparsers.add_parser("eval", help="perplexity / agreement / memory of a model against a baseline")
    e.add_argument("--model", required=True, help="model folder to evaluate")
    e.add_argument("--baseline", default=None, help="reference model folder (e.g. the unquantized one)")
    e.add_argument("--cpu-matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="CPU: the evaluated model's decoder linears (bfloat16: what the server runs where the CPU "
                        "has bf16 instructions, see engine.cpu_matmul_dtype); the baseline stays exact fp32")
    _add_eval_options(e)
    e.set_defaults(func=run_eval)


def run_quantize(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from leanserve.model.embedded import resolve_model_path
    from leanserve.model.loader import load_model
    from leanserve.quant.awq import (
        AWQSettings,
        calibration_from_text,
        quantize_model,
        self_generated_calibration,
    )
    from leanserve.quant.awq_format import write_checkpoint

    start = time.perf_counter()
    src = Path(resolve_model_path(args.model))
    config = ModelConfig.from_pretrained(src)
    if config.quantization is not None:
        raise SystemExit(f"{src} is already quantized ({config.quantization.get('quant_method')})")
    group = pick_group_size(args.group_size, config)
    if args.group_size == "auto" and group != 128:
        print(f"group size {group}: 128 does not divide every linear input size of this model")
    device = resolve_device(args.device)
    settings = AWQSettings(group_size=group, method=args.method, n_grid=args.n_grid,
                           search_tokens=args.search_tokens)
    model = load_model(src, device, torch.float32, pack_weights=False)
    calib = None
    if args.method == "awq":
        if args.calib is not None:
            tokenizer = AutoTokenizer.from_pretrained(src)
            calib = calibration_from_text(tokenizer, args.calib, args.samples, args.seq_len,
                                          end=1.0 - args.eval_fraction)
            print(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens from the first "
                  f"{100 * (1 - args.eval_fraction):.0f}% of {args.calib}")
        else:
            print("calibration: no --calib file given, using the DATA-FREE fallback: the model samples "
                  f"{args.samples} x {args.seq_len} tokens of its own text (temperature 1, top-p 0.95) "
                  "and calibrates on them")
            calib = self_generated_calibration(src, args.samples, args.seq_len)
    tensors = quantize_model(model, calib, settings)
    del model
    write_checkpoint(args.out, src, tensors, group)
    print(f"wrote {args.out} ({args.method}, int4, group {group}) in {time.perf_counter() - start:.0f} s")
    if args.skip_eval:
        return 0
    return _gate(args, args.out, src)


def _gate(args: argparse.Namespace, model: Path, baseline: Path) -> int:
    from leanserve.quant.evaluate import check_gate, evaluate, format_table

    result = evaluate(model, args.data or DEFAULT_EVAL, baseline, args.eval_tokens, args.window,
                      args.eval_fraction, resolve_device(args.device))
    print(format_table(result))
    print(result.to_json())
    failure = check_gate(result, args.max_ppl_increase)
    if failure is None:
        return 0
    if args.force:
        print(f"WARNING: {failure} (--force: keeping it)")
        return 0
    print(f"ERROR: {failure}", file=sys.stderr)
    return 1


def run_eval(args: argparse.Namespace) -> int:
    from leanserve.model.embedded import resolve_model_path
    from leanserve.quant.evaluate import evaluate, format_table

    model = resolve_model_path(args.model)
    baseline = resolve_model_path(args.baseline) if args.baseline else None
    result = evaluate(model, args.data or DEFAULT_EVAL, baseline, args.eval_tokens, args.window,
                      args.eval_fraction, resolve_device(args.device), getattr(torch, args.cpu_matmul_dtype))
    print(format_table(result))
    print(result.to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="leanserve")
    add_quant_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
