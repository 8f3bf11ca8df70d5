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

from leanserve.cli_types import non_negative_float, port, positive_int

DESCRIPTION = ("Serve an LLM over an OpenAI-compatible HTTP API at low cost; also quantize and evaluate "
               "models, route across replicas and estimate what serving costs.")

# Subcommands owned elsewhere: (module, function taking the subparsers object). A module that is not
# there yet is skipped, so each owner registers a command by adding its module, not by editing main().
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("leanserve.router.cli", "add_router_subcommand"),  # `leanserve router` (issue 8)
    # ---- registered here by their owners ----
    ("leanserve.quant.cli", "add_quant_subcommands"),  # `leanserve quantize`, `leanserve eval`
    ("leanserve.metrics.cost_cli", "add_cost_subcommand"),  # `leanserve cost` (not written yet)
]


def _kv_cache_memory(text: str) -> str:
    """Checked here for an early usage error, but passed on as text: settings parses every source's
    value with the same rule (a parsed "1B" would be the int 1, which reads as the fraction 1)."""
    from leanserve.settings import parse_kv_cache_memory

    try:
        parse_kv_cache_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (got {text!r})") from None
    return text


def _device(text: str) -> str:
    from leanserve.settings import check_device_name

    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (got {text!r})") from None


def add_serve_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from leanserve.settings import KV_CACHE_MEMORY_HELP

    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Every flag can also be set in the YAML config or as LEANSERVE_<NAME> "
        "(engine fields: LEANSERVE_ENGINE__<NAME>); flags win over the environment, which wins "
        "over the config file, and an unknown LEANSERVE_* variable is an error. A mistake in the "
        "settings or the model path stops the command before it listens (exit status 2); a model "
        "that fails to load stops the server (exit status 1).",
    )
    p.add_argument("--model", help="checkpoint folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--config", help="YAML settings file, e.g. configs/cpu-small.yaml")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=port, help="port (default 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--served-model-name", help="the model's name in the API (default: its folder name)")
    p.add_argument("--max-queued-requests", type=positive_int, help="admission bound, in sequences (429 above it)")
    p.add_argument("--max-request-body-bytes", type=positive_int, help="413 above this")
    p.add_argument("--drain-timeout", type=non_negative_float, dest="drain_timeout_s",
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--device", type=_device, help="auto | cpu | cuda | cuda:N (default auto: cuda if available)")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the model's dtype (default auto: float32 on CPU, bfloat16 on CUDA, float16 for AWQ)")
    e.add_argument("--block-size", type=positive_int, help="tokens per KV cache block (default 16)")
    e.add_argument("--kv-cache-memory", type=_kv_cache_memory, metavar="FRACTION_OR_SIZE",
                   help="KV cache budget (default 0.9): " + KV_CACHE_MEMORY_HELP.replace("%", "%%"))
    e.add_argument("--max-num-seqs", type=positive_int, help="sequences in one step (default 64)")
    e.add_argument("--max-num-batched-tokens", type=positive_int,
                   help="tokens in one step (default 256 on CPU, 2048 on CUDA)")
    e.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False)
    e.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_const", const=False)
    e.add_argument("--num-threads", type=positive_int, help="torch threads on CPU (default: re-picked while serving)")
    e.add_argument("--cache-dir", help="where converted GGUF checkpoints are kept")
    e.add_argument("--seed", type=int)
    e.add_argument("--cpu-matmul-dtype", choices=["auto", "float32", "bfloat16"],
                   help="CPU: the dtype of the decoder's packed linear weights (auto: bf16 where the CPU has "
                        "bf16 instructions; float32: exact fp32)")
    e.add_argument("--enforce-eager", action="store_true", default=None, help="CUDA: no decode CUDA graphs")
    c = p.add_argument_group("cost")
    c.add_argument("--usd-per-gpu-hour", type=non_negative_float, help="on CPU: the host's price per hour")
    c.add_argument("--num-gpus", type=positive_int, help="GPUs this server uses, for the cost metrics")
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-batch-wait-ms", type=non_negative_float,
                   help="cap of the adaptive batching window (default 20; 0 = off)")
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
    """Check everything that can be checked before binding the port; a mistake is one line and exit 2."""
    from pydantic import ValidationError

    from leanserve.preflight import check_startup
    from leanserve.settings import SettingsError, describe_validation_error, load_settings

    try:
        settings = load_settings(**serve_overrides(args))
        check_startup(settings)
    except ValidationError as exc:
        return _usage_error(f"invalid settings: {describe_validation_error(exc)}")
    except SettingsError as exc:
        return _usage_error(str(exc))
    from leanserve.api.server import run_server

    return run_server(settings)


def _usage_error(message: str) -> int:
    print(f"leanserve serve: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description=DESCRIPTION)
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
