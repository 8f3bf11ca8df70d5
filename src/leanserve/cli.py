"""`leanserve <command>`: one argparse entry point; each command lives in its own module.

`serve` flags default to "not given" (None) so that only the flags on the command line override
the environment and the YAML config (see `leanserve.settings` for the precedence).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

# Subcommands owned elsewhere: (module, function taking the subparsers object). A module that is not
# there yet is skipped, so each owner registers a command by adding its module, not by editing main().
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("leanserve.router.cli", "add_router_subcommand"),  # `leanserve router` (issue 8)
    # ---- registered here by their owners ----
    ("leanserve.quant.cli", "add_quant_subcommands"),  # `leanserve quantize`, `leanserve eval`
    ("leanserve.metrics.cost_cli", "add_cost_subcommand"),  # `leanserve cost` (not written yet)
]


def _number(text: str) -> int | float:
    """kv-cache-memory: "0.5" is a fraction of free memory, "4000000000" is bytes."""
    value = float(text)
    return int(value) if value.is_integer() and value > 1 else value


def add_serve_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Every flag can also be set in the YAML config or as LEANSERVE_<NAME> "
        "(engine fields: LEANSERVE_ENGINE__<NAME>); flags win over the environment, which wins "
        "over the config file.",
    )
    p.add_argument("--model", help="checkpoint folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--config", help="YAML settings file, e.g. configs/cpu-small.yaml")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--served-model-name", help="the model's name in the API (default: its folder name)")
    p.add_argument("--max-queued-requests", type=int, help="admission bound, in sequences (429 above it)")
    p.add_argument("--max-request-body-bytes", type=int, help="413 above this")
    p.add_argument("--drain-timeout", type=float, dest="drain_timeout_s",
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    e.add_argument("--block-size", type=int)
    e.add_argument("--kv-cache-memory", type=_number, help="bytes, or a fraction (0-1] of free memory")
    e.add_argument("--max-num-seqs", type=int)
    e.add_argument("--max-num-batched-tokens", type=int)
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False)
    e.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_const", const=False)
    e.add_argument("--num-threads", type=int, help="torch threads on CPU")
    e.add_argument("--cache-dir", help="where converted GGUF checkpoints are kept")
    e.add_argument("--seed", type=int)
    e.add_argument("--cpu-matmul-dtype", choices=["auto", "float32", "bfloat16"],
                   help="CPU: the dtype of the decoder's packed linear weights (auto: bf16 where the CPU has "
                        "bf16 instructions; float32: exact fp32)")
    e.add_argument("--enforce-eager", action="store_true", default=None, help="CUDA: no decode CUDA graphs")
    c = p.add_argument_group("cost")
    c.add_argument("--usd-per-gpu-hour", type=float, help="on CPU: the host's price per hour")
    c.add_argument("--num-gpus", type=int)
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-batch-wait-ms", type=float)
    p.set_defaults(func=run_serve)
    return p


_ENGINE = ("device", "dtype", "block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
           "max_model_len", "enable_prefix_caching", "enable_chunked_prefill", "num_threads", "cache_dir",
           "seed", "cpu_matmul_dtype", "enforce_eager")
_TOP = ("model", "config", "host", "port", "api_key", "served_model_name", "max_queued_requests",
        "max_request_body_bytes", "drain_timeout_s", "log_level")


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, shaped like ``ServerSettings`` (None = not given)."""
    v = vars(args)
    return {
        **{k: v.get(k) for k in _TOP},
        "engine": {k: v.get(k) for k in _ENGINE},
        "cost": {"usd_per_gpu_hour": v.get("usd_per_gpu_hour"), "num_gpus": v.get("num_gpus")},
        "scheduler": {"max_batch_wait_ms": v.get("max_batch_wait_ms")},
    }


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from leanserve.settings import load_settings

    try:
        settings = load_settings(**serve_overrides(args))
    except (ValidationError, FileNotFoundError) as exc:
        print(f"leanserve serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from leanserve.api.server import run_server

    return run_server(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    add_serve_subcommand(subparsers)
    for module_name, function_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # not written yet
            raise
        register: Callable[[argparse._SubParsersAction], Any] = getattr(module, function_name)
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from leanserve import __version__

        print(__version__)
        return 0
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
