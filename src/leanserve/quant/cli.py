"""``leanserve quantize`` and ``leanserve eval``.

The main CLI registers these with ``add_quant_subcommands(subparsers)``; ``python -m
leanserve.quant.cli`` runs them on their own.

Every input is checked before any work: flag values by argparse, then (from the model's config and
tokenizer, both cheap) whether the texts are long enough, the windows fit the context and ``--out`` is
safe to write. A bad input is a one-line error and exit 2; a failed quality gate is exit 1.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from leanserve.cli_types import non_negative_float, positive_int
from leanserve.model.config import ModelConfig
from leanserve.quant.validators import UsageError, existing_file, group_size, model_path, open_fraction, window_size

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from leanserve.quant.evaluate import EvalResult

Command = Callable[[argparse.Namespace], int]

DATA_TEXTS = ("pride_and_prejudice.txt", "shakespeare.txt")
GROUP_SIZE_PREFERENCE = (128, 64, 32)


def checkout_data_dir(module_file: Path = Path(__file__)) -> Path | None:
    """``../shared/data`` beside a source checkout (``<root>/src/leanserve/quant/cli.py``), else None.

    An installed package has no such neighbour: the same relative path would point somewhere under the
    environment's ``lib/`` that nobody put data in.
    """
    here = module_file.resolve()
    root = here.parents[3]
    if here.parents[2].name != "src" or not (root / "pyproject.toml").is_file():
        return None
    return root.parent / "shared" / "data"


# The shared public-domain texts live beside the repository (never copied into it).
DATA_DIR = checkout_data_dir()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_group_size(requested: str | int, config: ModelConfig) -> int:
    """``auto``: the largest of 128/64/32 that divides every linear's input size (AWQ needs whole groups)."""
    dims = {config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size}
    if requested != "auto":
        group = int(requested)
        bad = sorted(d for d in dims if d % group)
        if bad:
            raise UsageError(
                f"--group-size {group} does not divide the linear input sizes {bad}; AWQ needs whole "
                f"groups. Use --group-size auto (picks the largest of {GROUP_SIZE_PREFERENCE} that fits)."
            )
        return group
    for group in GROUP_SIZE_PREFERENCE:
        if all(d % group == 0 for d in dims):
            return group
    raise UsageError(f"no group size in {GROUP_SIZE_PREFERENCE} divides the linear input sizes {sorted(dims)}")


# ---- arguments -------------------------------------------------------------------------------------


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_file, action="append", default=None,
                   help="held-out text file(s), scored on their last --eval-fraction; the first one gates "
                        f"(default: {', '.join(DATA_TEXTS)} from ../shared/data beside a source checkout; "
                        "required elsewhere)")
    p.add_argument("--eval-tokens", type=positive_int, default=4096, help="tokens scored per data file")
    p.add_argument("--window", type=window_size, default=512,
                   help="tokens per perplexity window (2 up to the model's context)")
    p.add_argument("--eval-fraction", type=open_fraction, default=0.2,
                   help="the tail of each file that is held out for evaluation, in (0, 1) (calibration reads "
                        "the rest)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def add_quant_subcommands(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser("quantize", help="AWQ int4-quantize a model into an AutoAWQ-format folder")
    q.add_argument("--model", type=model_path, default=None,
                   help="source HF folder or .gguf (default: the embedded model)")
    q.add_argument("--out", required=True, type=Path,
                   help="destination folder: new or empty (a previous quantize output only with --overwrite); "
                        "written only once the quality gate passes (or with --force), never half-written")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds a previous quantize output (any other non-empty folder "
                        "is refused)")
    q.add_argument("--group-size", type=group_size, default="auto",
                   help="input channels per scale/zero (default auto: 128 if it divides every linear, else 64, 32)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq",
                   help="awq (activation-aware scales + clipping) or rtn (plain round-to-nearest, for comparison)")
    q.add_argument("--calib", type=existing_file, default=None,
                   help="calibration text, its first (1 - --eval-fraction) is used and must hold at least "
                        "--seq-len tokens; without it the model generates its own calibration text "
                        "(data-free fallback)")
    q.add_argument("--samples", type=positive_int, default=16, help="calibration sequences")
    q.add_argument("--seq-len", type=positive_int, default=512,
                   help="tokens per calibration sequence (at most the model's context)")
    q.add_argument("--n-grid", type=positive_int, default=20, help="alpha grid points for the scale search")
    q.add_argument("--search-tokens", type=positive_int, default=2048,
                   help="tokens whose block output error scores each candidate scale")
    q.add_argument("--max-ppl-increase", type=non_negative_float, default=5.0,
                   help="fail when held-out perplexity rises more than this many percent (>= 0)")
    q.add_argument("--force", action="store_true", help="keep the checkpoint and exit 0 even if the gate fails")
    q.add_argument("--skip-eval", action="store_true",
                   help="do not run the quality gate (then no --data is needed)")
    _add_eval_options(q)
    q.set_defaults(func=run_quantize)

    e = subparsers.add_parser("eval", help="perplexity / agreement / memory of a model against a baseline")
    e.add_argument("--model", required=True, type=model_path, help="model folder (or .gguf) to evaluate")
    e.add_argument("--baseline", type=model_path, default=None,
                   help="reference model folder (e.g. the unquantized one); needs the same tokenizer")
    e.add_argument("--cpu-matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="CPU: the evaluated model's decoder linears (bfloat16: what the server runs where the CPU "
                        "has bf16 instructions, see engine.cpu_matmul_dtype); the baseline stays exact fp32")
    _add_eval_options(e)
    e.set_defaults(func=run_eval)


def _reports_usage_errors(command: str) -> Callable[[Command], Command]:
    """Print a ``UsageError`` as argparse prints a bad flag: one line, exit 2, no traceback."""

    def wrap(run: Command) -> Command:
        @functools.wraps(run)
        def checked(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except UsageError as exc:
                print(f"leanserve {command}: error: {exc}", file=sys.stderr)
                return 2

        return checked

    return wrap


# ---- checks that need the model's config or tokenizer ---------------------------------------------


def _resolve_model(text: str | None) -> Path:
    from leanserve.model.embedded import resolve_model_path

    try:
        return Path(resolve_model_path(text))
    except RuntimeError as exc:
        if text is not None:
            raise
        raise UsageError(str(exc)) from None  # no --model, and the embedded model is not installed


def _eval_files(args: argparse.Namespace, alternative: str = "") -> list[Path]:
    """--data, or the checkout's shared texts; never a guess relative to an installed package."""
    if args.data:
        return args.data
    defaults = [DATA_DIR / name for name in DATA_TEXTS] if DATA_DIR is not None else []
    if defaults and all(path.is_file() for path in defaults):
        return defaults
    where = f"are not in {DATA_DIR}" if DATA_DIR is not None else "exist only beside a source checkout"
    raise UsageError(f"no --data given, and the default evaluation texts {where}; pass --data FILE{alternative}")


def _check_fits_context(flag: str, tokens: int, config: ModelConfig) -> None:
    if tokens > config.max_position_embeddings:
        raise UsageError(
            f"{flag} {tokens} is longer than the model's context ({config.max_position_embeddings} positions)"
        )


def _check_eval_texts(tokenizer: PreTrainedTokenizerBase, files: list[Path], window: int, eval_fraction: float) -> None:
    from leanserve.quant.awq import TextTooShort
    from leanserve.quant.evaluate import eval_windows

    for path in files:
        try:
            eval_windows(tokenizer, path, window, window, eval_fraction)
        except TextTooShort as exc:
            raise UsageError(
                f"--data {path} is too short: its held-out last {eval_fraction:.0%} has {exc.tokens} tokens, "
                f"one --window needs {exc.needed}"
            ) from None


def _eval_inputs(
    args: argparse.Namespace, config: ModelConfig, tokenizer: PreTrainedTokenizerBase, alternative: str = ""
) -> list[Path]:
    """The data files to score, after checking that each holds at least one window."""
    files = _eval_files(args, alternative)
    _check_fits_context("--window", args.window, config)
    _check_eval_texts(tokenizer, files, args.window, args.eval_fraction)
    return files


def _vocabulary_mismatch(model: Path, tokenizer: PreTrainedTokenizerBase, baseline: Path) -> str | None:
    from transformers import AutoTokenizer

    sizes = ModelConfig.from_pretrained(model).vocab_size, ModelConfig.from_pretrained(baseline).vocab_size
    if sizes[0] != sizes[1]:
        return f"--model has {sizes[0]} vocabulary entries and --baseline {sizes[1]}"
    if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(baseline).get_vocab():
        return "their tokenizers map text to different token ids"
    return None


def _check_same_vocabulary(model: Path, tokenizer: PreTrainedTokenizerBase, baseline: Path) -> None:
    # Perplexity, agreement and KL compare the two models token id by token id.
    mismatch = _vocabulary_mismatch(model, tokenizer, baseline)
    if mismatch is not None:
        raise UsageError(
            f"--baseline {baseline} cannot be compared with --model {model}: {mismatch}; the baseline must "
            "use the same tokenizer (e.g. the model it was quantized from)"
        )


# ---- quantize --------------------------------------------------------------------------------------


@dataclass
class QuantizeJob:
    """Everything ``quantize`` needs, known to be valid before the work starts."""

    src: Path
    out: Path  # --out made absolute: staging goes beside it, which "." or ".." do not name
    group: int
    calib: torch.Tensor | None  # calibration tokens from --calib; None: data-free (awq) or none needed (rtn)
    eval_files: list[Path]  # empty with --skip-eval


def _text_calibration(tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> torch.Tensor:
    from leanserve.quant.awq import TextTooShort, calibration_from_text

    end = 1.0 - args.eval_fraction
    try:
        calib = calibration_from_text(tokenizer, args.calib, args.samples, args.seq_len, end=end)
    except TextTooShort as exc:
        raise UsageError(
            f"--calib {args.calib} is too short: its first {end:.0%} has {exc.tokens} tokens, one sample needs "
            f"--seq-len {exc.needed}"
        ) from None
    print(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens from the first {100 * end:.0f}% of {args.calib}")
    return calib


def _prepare_quantize(args: argparse.Namespace) -> QuantizeJob:
    from transformers import AutoTokenizer

    from leanserve.quant.output import check_out_dir

    src = _resolve_model(args.model)
    config = ModelConfig.from_pretrained(src)
    if config.quantization is not None:
        raise UsageError(f"{src} is already quantized ({config.quantization.get('quant_method')})")
    check_out_dir(args.out, src, args.overwrite)
    group = pick_group_size(args.group_size, config)
    if args.group_size == "auto" and group != 128:
        print(f"group size {group}: 128 does not divide every linear input size of this model")
    _check_fits_context("--seq-len", args.seq_len, config)
    tokenizer = AutoTokenizer.from_pretrained(src)
    eval_files = [] if args.skip_eval else _eval_inputs(args, config, tokenizer, " or --skip-eval")
    calib = _text_calibration(tokenizer, args) if args.method == "awq" and args.calib is not None else None
    return QuantizeJob(src, args.out.resolve(), group, calib, eval_files)


def _quantize(args: argparse.Namespace, job: QuantizeJob) -> dict[str, torch.Tensor]:
    from leanserve.model.loader import load_model
    from leanserve.quant.awq import AWQSettings, quantize_model, self_generated_calibration

    calib = job.calib
    if args.method == "awq" and calib is None:
        print("calibration: no --calib file given, using the DATA-FREE fallback: the model samples "
              f"{args.samples} x {args.seq_len} tokens of its own text (temperature 1, top-p 0.95) "
              "and calibrates on them")
        calib = self_generated_calibration(job.src, args.samples, args.seq_len)
    settings = AWQSettings(group_size=job.group, method=args.method, n_grid=args.n_grid,
                           search_tokens=args.search_tokens)
    model = load_model(job.src, resolve_device(args.device), torch.float32, pack_weights=False)
    return quantize_model(model, calib, settings)


def _gate_eval(args: argparse.Namespace, checkpoint: Path, job: QuantizeJob) -> EvalResult:
    from leanserve.quant.evaluate import evaluate

    print(f"quality gate: scoring the checkpoint against {job.src}")
    result = evaluate(checkpoint, job.eval_files, job.src, args.eval_tokens, args.window, args.eval_fraction,
                      resolve_device(args.device))
    result.model = str(args.out)  # scored in its staging folder; report where it is meant to go
    return result


def _report(args: argparse.Namespace, job: QuantizeJob, result: EvalResult | None, failure: str | None,
            kept: bool, seconds: float) -> None:
    """The gate's table and verdict, then where the checkpoint went; the JSON line comes last."""
    from leanserve.quant.evaluate import format_table

    if result is not None:
        print(format_table(result))
    if failure is not None and kept:
        print(f"WARNING: {failure} (--force: keeping it)")
    elif failure is not None:
        print(f"ERROR: {failure}", file=sys.stderr)
        print(f"{args.out} was not written: the rejected checkpoint was deleted", file=sys.stderr)
    if kept:
        print(f"wrote {args.out} ({args.method}, int4, group {job.group}) in {seconds:.0f} s")
    if result is not None:
        print(result.to_json())


@_reports_usage_errors("quantize")
def run_quantize(args: argparse.Namespace) -> int:
    from leanserve.quant.awq_format import write_checkpoint
    from leanserve.quant.evaluate import check_gate
    from leanserve.quant.output import install, staging_dir

    start = time.perf_counter()
    job = _prepare_quantize(args)
    # Staged beside --out from the start: an unwritable place fails before the work, and the folder is
    # moved to --out only once kept, so a crash or a failed gate leaves nothing there.
    with staging_dir(job.out) as tmp:
        write_checkpoint(tmp, job.src, _quantize(args, job), job.group)
        result = None if args.skip_eval else _gate_eval(args, tmp, job)
        failure = None if result is None else check_gate(result, args.max_ppl_increase)
        kept = failure is None or args.force
        if kept:
            install(tmp, job.out)
    _report(args, job, result, failure, kept, time.perf_counter() - start)
    return 0 if kept else 1


# ---- eval ------------------------------------------------------------------------------------------


@_reports_usage_errors("eval")
def run_eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from leanserve.quant.evaluate import evaluate, format_table

    model = _resolve_model(args.model)
    baseline = _resolve_model(args.baseline) if args.baseline else None
    tokenizer = AutoTokenizer.from_pretrained(model)
    if baseline is not None:
        _check_same_vocabulary(model, tokenizer, baseline)
    files = _eval_inputs(args, ModelConfig.from_pretrained(model), tokenizer)
    result = evaluate(model, files, baseline, args.eval_tokens, args.window, args.eval_fraction,
                      resolve_device(args.device), getattr(torch, args.cpu_matmul_dtype))
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
