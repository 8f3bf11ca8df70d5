"""Compile every Triton kernel for a CUDA target ahead of time, without a GPU.

The kernels are launched through their real launchers (``paged_decode_attention``, ``paged_prefill_attention``,
``write_kv_cache``, ``write_kv_cache_rotary``, ``awq_gemm``, ``gemv``, ``int4_gemv``, ``rms_norm``, ``apply_rotary``,
``silu_and_mul``) on CPU tensors
of the shapes the server uses (``--tests``: also through the kernel tests), with a stand-in Triton driver
that reports a CUDA target. Every case runs twice, with programmatic dependent launch off and on (the
launchers' ``pdl_enabled`` answers as an sm_90 GPU would); kernels without PDL give the same compile.
Each launch is stopped just before compilation, so every kernel is captured with exactly the signature,
constexprs, specialisation (divisibility / ``== 1``) and num_warps/num_stages the launcher would give it
on the GPU. Each capture is then compiled to a cubin with ``triton.compile`` (frontend, TTGIR for the
target, LLVM, PTX, then the ``ptxas`` bundled with triton), and the ptxas report gives registers and
spills per kernel.

    python benchmarks/aot_compile_check.py [--arch 90] [--full] [--tests [PATH ...]] [--jobs N] [-v]
                                           [--only NAME] [--dump DIR] [--awq-gemv JSON]
                                           [--int4-gemv JSON]

Prints one line per distinct compile (``ok`` with registers, spill stores/loads and stack in bytes per
thread, shared memory per program; or ``FAIL`` and the error). A launcher case that raises, or a kernel
launched in kernels/ that no case reaches, is a failure too. Exits 1 on any failure, 2 if this triton
cannot target CUDA here (no NVIDIA backend or no ptxas), 0 otherwise; spills are reported, not failed.
It never touches a GPU and runs the same with or without one.
"""

from __future__ import annotations

import os

# @triton.jit picks the interpreter at decoration time: make sure the real JIT is used.
os.environ["TRITON_INTERPRET"] = "0"
# Triton 3.9 warns that this default changes in 3.10; 1 is what 3.6 (and 3.9) do anyway.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"
PKG = "_aot_kernels"  # the repo's kernels/ loaded under a private name (benchmarks/kernels.py would shadow it)

BLOCK_SIZE = 16  # configs/default.yaml block_size
DTYPES = ("float16", "bfloat16", "float32")
# (name, num_heads, num_kv_heads, head_dim). The default run covers both head dims with GROUP 3 and 4;
# --full adds the other GROUPs (each GROUP is its own constexpr, so its own compile).
MODELS = (
    ("smollm2-135m", 9, 3, 64),  # GROUP 3 (padded to BLOCK_G 16)
    ("llama-3.1-8b", 32, 8, 128),  # GROUP 4
)
FULL_MODELS = MODELS + (
    ("llama-3.2-1b", 32, 8, 64),  # GROUP 4
    ("qwen2.5-7b", 28, 4, 128),  # GROUP 7
)
# AWQ linears: (name, K = in_features, N = out_features, group_size); (M, bias) launched on each:
# M=1 the GEMV (plus an unsplit one with bias through gemv_config={"splits": 1} when the launcher
# takes it), M=16/32 the tiled kernel, M=64 whatever the launcher picks for prefill sizes.
AWQ_CASES = (
    (("llama-1b-mlp-up", 2048, 8192, 128), ((1, False), (16, True), (32, False))),
    # M=64: small; M=256: dequantize, then a CPU matmul here (the launch is stubbed, the matmul is not)
    (("smollm2-mlp-up", 576, 1536, 64), ((1, True), (64, True), (256, False))),
)
# RMSNorm widths (hidden sizes): SmolLM2, Llama-1B, Llama-8B (and 8192, num_warps 8, with --full).
NORM_WIDTHS = (576, 2048, 4096)
FULL_NORM_WIDTHS = NORM_WIDTHS + (8192,)
# MLP intermediate sizes (silu_and_mul): SmolLM2, Llama-1B (and Llama-8B, Qwen-0.5B with --full).
MLP_WIDTHS = (1536, 8192)
FULL_MLP_WIDTHS = MLP_WIDTHS + (14336, 4864, 100)
FULL_AWQ_SHAPES = (
    ("smollm2-mlp-up", 576, 1536, 64),
    ("llama-1b-mlp-up", 2048, 8192, 128),
    ("llama-1b-qkv-g32", 2048, 3072, 32),  # BLOCK_K 32
)
# Decode GEMVs: ((name, N = out_features, K = in_features), rows M). Each M up to the next power of two
# is its own compile (M_PAD); each launch also runs unsplit with a bias. TinyLlama-1.1B's projections
# (benchmarks/decode_step.py) plus an odd shape (ragged N and K: the masked tail tile).
GEMV_CASES = (
    (("tinyllama-qkv", 2560, 2048), (1, 8)),
    (("tinyllama-gate_up", 11264, 2048), (1, 8)),
    (("tinyllama-down", 2048, 5632), (1, 2)),
    (("odd", 1000, 100), (3,)),
)
GEMV_FULL_CASES = GEMV_CASES + (
    (("tinyllama-o", 2048, 2048), (1, 2, 4, 8)),
    (("smollm2-qkv", 960, 576), (1, 5)),
    (("llama-8b-down", 4096, 14336), (1, 8)),
)


@dataclass
class Job:
    case: str  # the launcher call that produced it
    kernel: str
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str = ""


@dataclass
class Result:
    case: str
    kernel: str
    summary: str  # constexprs / warps / stages
    ok: bool
    seconds: float
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    error: str = ""


# ---------------------------------------------------------------------------------------------------
# Capture: a fake driver with a CUDA target, and _do_compile replaced by a recorder.


class _FakeDriver:
    """Just enough of a Triton driver for JITFunction.run to bind and specialise arguments."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


CAPTURED: list[Job] = []
_current_case = ["?"]


def _recording_do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    CAPTURED.append(
        Job(
            case=_current_case[0], kernel=self.fn.__name__, fn=self, signature=dict(signature),
            constexprs=dict(constexprs), attrs=dict(attrs), options=dict(options.__dict__),
        )
    )
    return None  # JITFunction.run returns before launching


def _load_kernels():
    """Import the repo's kernels/ package (all modules) under PKG; returns {module name: module}."""
    spec = importlib.util.spec_from_file_location(
        PKG, KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = pkg
    spec.loader.exec_module(pkg)
    modules = {}
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.stem == "__init__":
            continue
        try:
            modules[path.stem] = importlib.import_module(f"{PKG}.{path.stem}")
        except Exception as e:  # a module that does not import is itself a failure to report
            modules[path.stem] = e
    return modules


def _launched_kernels(modules) -> dict[str, str]:
    """JIT functions that some launcher launches (``name[grid](...)``), as {name: module}."""
    import triton

    found = {}
    for mod_name, mod in modules.items():
        if isinstance(mod, Exception):
            continue
        src = Path(mod.__file__).read_text()
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and re.search(rf"\b{name}\s*\[", src):
                found[name] = mod_name
    return found


def _cases(modules, full: bool):
    """Yields (case name, thunk) for every launcher call to capture.

    A generator on purpose: each thunk is run before the loops move on, so closures see this
    iteration's shapes and dtype.
    """
    import torch

    def usable(name):
        mod = modules.get(name)
        return None if isinstance(mod, Exception) else mod

    pa, kv, awq = (usable(n) for n in ("paged_attention", "kv_cache", "awq_gemm"))
    gemv_mod, int4 = usable("gemv"), usable("int4_gemv")

    def launcher(name):
        """A Triton launcher by function name, from whichever kernels/ module defines it (files move)."""
        for mod_name, mod in modules.items():
            if mod_name not in ("reference", "awq_reference", "backend") and not isinstance(mod, Exception):
                fn = getattr(mod, name, None)
                if callable(fn) and getattr(fn, "__module__", None) == mod.__name__:
                    return fn
        return None

    rms_norm, apply_rotary, silu_and_mul = (launcher(n) for n in ("rms_norm", "apply_rotary", "silu_and_mul"))
    models = FULL_MODELS if full else MODELS
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for model, heads, kv_heads, head_dim in models:
            tag = f"{dtype_name}/{model}(h{heads},kv{kv_heads},d{head_dim})"
            gen = torch.Generator().manual_seed(0)

            def cache(num_blocks, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype):
                shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
                return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)

            def tables(lens, num_blocks, extra_cols=1, gen=gen):
                width = max(-(-n // BLOCK_SIZE) for n in lens) + extra_cols
                t = torch.randint(0, num_blocks, (len(lens), width), generator=gen, dtype=torch.int32)
                return t, torch.tensor(lens, dtype=torch.int32)

            if apply_rotary is not None:
                def rotary(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype):
                    # q and k as the model passes them: views of the fused QKV output, rotated in place.
                    tokens, max_pos = 37, 4096
                    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
                    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
                    cos = torch.zeros(max_pos, head_dim // 2)
                    apply_rotary(q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
                                    torch.arange(tokens, dtype=torch.int64), cos, torch.zeros_like(cos))

                yield (f"apply_rotary {tag}", rotary)

            if kv is not None:
                def write_kv(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype):
                    # key/value as the model passes them: k after rotary (contiguous), v a view of fused qkv.
                    tokens = 37
                    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
                    _, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
                    k = k.contiguous().view(tokens, kv_heads, head_dim)
                    v = v.view(tokens, kv_heads, head_dim)
                    kc, vc = cache(64)
                    slots = torch.arange(tokens, dtype=torch.int64)
                    slots[-1] = -1
                    kv.write_kv_cache(k, v, kc, vc, slots)

                yield (f"write_kv_cache {tag}", write_kv)

                def rotary_write_kv(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype):
                    # The decoder's form: q, k, v views of the fused QKV output, rotated and written at once.
                    tokens, max_pos = 37, 4096
                    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
                    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
                    cos = torch.zeros(max_pos, head_dim // 2)
                    kc, vc = cache(64)
                    slots = torch.arange(tokens, dtype=torch.int64)
                    slots[-1] = -1
                    kv.write_kv_cache_rotary(q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
                                             v.view(tokens, kv_heads, head_dim), torch.arange(tokens), cos,
                                             torch.zeros_like(cos), kc, vc, slots)

                yield (f"write_kv_cache_rotary {tag}", rotary_write_kv)

            if pa is not None:
                def decode(parts, num_seqs, lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype):
                    num_blocks = 1000
                    kc, vc = cache(num_blocks)
                    t, cl = tables(lens, num_blocks)
                    q = torch.zeros(num_seqs, heads, head_dim, dtype=dtype)
                    pa.paged_decode_attention(q, kc, vc, t, cl, head_dim**-0.5, max(lens), num_partitions=parts)

                lens8 = [300, 1000, 17, 64, 513, 2000, 5, 900]
                yield (f"decode no-split {tag}", lambda d=decode, lens=lens8: d(1, 8, lens))
                yield (f"decode split=4 {tag}", lambda d=decode, lens=lens8: d(4, 8, lens))
                if full:
                    # One sequence: ints equal to 1 are specialised to constexprs, so this is another compile.
                    yield (f"decode split=64 1-seq {tag}", lambda d=decode: d(64, 1, [20000]))

                def prefill(q_lens, ctx_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype):
                    num_blocks = 1000
                    kc, vc = cache(num_blocks)
                    t, cl = tables(ctx_lens, num_blocks)
                    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
                    # The model passes query[n_dec:], a view that starts after the decode tokens.
                    n_dec = 3
                    q = torch.zeros(n_dec + sum(q_lens), heads, head_dim, dtype=dtype)[n_dec:]
                    pa.paged_prefill_attention(q, kc, vc, t, cu, cl, head_dim**-0.5)

                yield (f"prefill 3-seq {tag}", lambda p=prefill: p([100, 7, 512], [100, 300, 600]))
                if full:
                    yield (f"prefill 1-seq {tag}", lambda p=prefill: p([77], [77]))

        if rms_norm is not None:
            for width in FULL_NORM_WIDTHS if full else NORM_WIDTHS:
                for residual in (False, True):
                    def norm(width=width, residual=residual, dtype=dtype):
                        x = torch.zeros(5, width, dtype=dtype)
                        res = torch.zeros_like(x) if residual else None
                        rms_norm(x, torch.ones(width, dtype=dtype), 1e-6, res)

                    yield (f"rms_norm residual={residual} {dtype_name}/hidden{width}", norm)

        if silu_and_mul is not None:
            for width in FULL_MLP_WIDTHS if full else MLP_WIDTHS:
                def silu(width=width, dtype=dtype):
                    silu_and_mul(torch.zeros(5, 2 * width, dtype=dtype))  # the gate_up projection's output

                yield (f"silu_and_mul {dtype_name}/intermediate{width}", silu)

        if gemv_mod is not None:
            for (shape_name, n, k), rows in GEMV_FULL_CASES if full else GEMV_CASES:
                for m in rows:
                    for bias, config in ((False, None), (True, gemv_mod.GemvConfig(splits=1))):
                        def linear(m=m, n=n, k=k, bias=bias, config=config, dtype=dtype):
                            b = torch.zeros(n, dtype=dtype) if bias else None
                            gemv_mod.gemv(torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype), b,
                                          config=config)

                        split = "auto" if config is None else "1"
                        yield (f"gemv m={m} bias={bias} splits={split} {dtype_name}/{shape_name}(N{n},K{k})", linear)
                # The decoder's 1-row fusions (gemv.norm_gated_linear, gemv.linear_residual): each is its
                # own specialisation; and the resident-grid launch (GemvConfig.persistent), plain and fused.
                for fusion, persistent in itertools.product(("", "gated", "residual"), (False, True)):
                    if not (fusion or persistent):
                        continue

                    def fused(n=n, k=k, fusion=fusion, persistent=persistent, dtype=dtype):
                        gated = fusion == "gated"
                        n_out = n // 2 if gated else n
                        res = torch.zeros(1, n_out, dtype=dtype) if fusion == "residual" else None
                        gemv_mod.gemv(torch.zeros(1, k, dtype=dtype), torch.zeros(n, k, dtype=dtype),
                                      residual=res, out=res, gated=gated,
                                      config=gemv_mod.GemvConfig(persistent=persistent))

                    yield (f"gemv m=1 {fusion or 'plain'} persistent={persistent} {dtype_name}/{shape_name}(N{n},K{k})",
                           fused)

        if awq is not None:
            has_gemv_config = "gemv_config" in awq.awq_gemm.__code__.co_varnames
            if full:
                plan = [(shape, [(m, b) for m in (1, 16, 32, 256) for b in (False, True)]) for shape in FULL_AWQ_SHAPES]
            else:
                plan = [(shape, list(launches)) for shape, launches in AWQ_CASES]
            for (shape_name, k, n, group), launches in plan:
                tag = f"{dtype_name}/{shape_name}(K{k},N{n},g{group})"

                def gemm(m, bias, gemv_config=None, k=k, n=n, group=group, dtype=dtype):
                    x = torch.zeros(m, k, dtype=dtype)
                    qw = torch.empty(k, n // 8, dtype=torch.int32)
                    qz = torch.zeros(k // group, n // 8, dtype=torch.int32)
                    sc = torch.zeros(k // group, n, dtype=torch.float16)
                    b = torch.zeros(n, dtype=dtype) if bias else None
                    kwargs = {"gemv_config": gemv_config} if gemv_config else {}
                    awq.awq_gemm(x, qw, qz, sc, group, b, **kwargs)

                for m, bias in launches:
                    yield (f"awq m={m} bias={bias} {tag}", lambda g=gemm, m=m, b=bias: g(m, b))
                if has_gemv_config and (full or (1, False) in launches):
                    for bias in (False, True) if full else (True,):
                        yield (
                            f"awq m=1 bias={bias} gemv_config=splits1 {tag}",
                            lambda g=gemm, b=bias: g(1, b, {"splits": 1}),
                        )
            if dtype_name == "float16":
                # --awq-gemv: the given launch configs at the issue-7 bar's shape, 4096 -> 11008
                for config in AWQ_GEMV_CONFIGS:
                    yield (f"awq m=1 gemv_config={config} float16/bar(K4096,N11008,g128)",
                           lambda g=gemm, c=config: g(1, False, c, k=4096, n=11008, group=128))

        if int4 is not None:
            # The K-major int4 GEMV (not yet routed in serving): the bar's shape, and two of the AWQ shapes
            # (SmolLM2's K = 576 is not a whole tile: the masked path).
            shapes = INT4_CASES if dtype_name != "float32" else INT4_CASES[1:]
            configs = [{}] + (INT4_GEMV_CONFIGS if dtype_name == "float16" else [])
            for (shape_name, k, n, group), config in ((s, c) for s in shapes for c in configs):
                for m, bias in ((1, False), (2, True)) if not config else ((1, False),):
                    def kmajor(m=m, bias=bias, k=k, n=n, group=group, config=config, dtype=dtype):
                        weight = int4.KMajorInt4(torch.empty(n, k // 8, dtype=torch.int32),
                                                 torch.zeros(n, k // group, dtype=torch.int32), group)
                        b = torch.zeros(n, dtype=dtype) if bias else None
                        int4.int4_gemv(torch.zeros(m, k, dtype=dtype), weight, b,
                                       config=int4.Int4GemvConfig(**config))

                    yield (f"int4_gemv m={m} bias={bias} config={config} {dtype_name}/{shape_name}(K{k},N{n},g{group})",
                           kmajor)

                def dequant(k=k, n=n, group=group, dtype=dtype):
                    weight = int4.KMajorInt4(torch.empty(n, k // 8, dtype=torch.int32),
                                             torch.zeros(n, k // group, dtype=torch.int32), group)
                    int4.dequantize_int4(weight, torch.empty(n, k, dtype=dtype))

                yield (f"dequantize_int4 {dtype_name}/{shape_name}(K{k},N{n},g{group})", dequant)


INT4_CASES = (
    ("bar", 4096, 11008, 128),
    ("llama-1b-mlp-down", 8192, 2048, 128),
    ("smollm2-mlp-up", 576, 1536, 64),
)
INT4_GEMV_CONFIGS: list[dict] = []  # --int4-gemv
AWQ_GEMV_CONFIGS: list[dict] = []  # --awq-gemv
_SMS = [132]
_PDL = [False]  # what the launchers' pdl_enabled answers for the case being captured
_PATCHED: list = []


# What the launchers ask of the device, answered as an sm_90 GPU would (CPU tensors would always say no).
_AS_ON_THE_GPU = {
    "num_sms": lambda device, *a, **k: _SMS[0],
    "_num_sms": lambda device, *a, **k: _SMS[0],
    "pdl_enabled": lambda device: _PDL[0],  # off and on, per case
}


def _patch_sms() -> None:
    """Launchers size grids (split-K, KV partitions) by the SM count, and that becomes constexprs such
    as K_PER_SPLIT; whether they use PDL becomes a constexpr too: make every loaded kernels module
    answer ``_AS_ON_THE_GPU``, not like the CPU path."""
    done = {(id(mod), attr) for mod, attr, _ in _PATCHED}
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "") or ""
        if not name.startswith((PKG + ".", "leanserve.kernels.")):
            continue
        for attr, answer in _AS_ON_THE_GPU.items():
            fn = getattr(mod, attr, None)
            if callable(fn) and (id(mod), attr) not in done:
                _PATCHED.append((mod, attr, fn))
                setattr(mod, attr, answer)


def _run_tests(paths: list[str]) -> str:
    """Run pytest on ``paths`` in this process (launches recorded, not run); returns its summary line.

    The tests' asserts fail here by design (no kernel runs, outputs stay garbage); what matters is that
    every kernel configuration they would compile on a GPU gets captured. ``gpu``-marked tests, which
    their conftest skips without CUDA, are un-skipped.
    """
    import pytest

    try:
        import leanserve.kernels  # noqa: F401  (installed: pip install -e .)
    except ImportError:  # a bare venv: leanserve from src/, leanserve.kernels from kernels/
        sys.path.insert(0, str(ROOT / "src"))
        import leanserve

        spec = importlib.util.spec_from_file_location(
            "leanserve.kernels", KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["leanserve.kernels"] = mod
        spec.loader.exec_module(mod)
        leanserve.kernels = mod
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the tests import their helpers as tests.kernels.<module>

    class Plugin:
        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, config, items):
            for item in items:
                item.own_markers[:] = [
                    m for m in item.own_markers
                    if not (m.name == "skip" and "CUDA" in str(m.kwargs.get("reason", "")))
                ]

        def pytest_collection_finish(self, session):
            _patch_sms()  # the test modules have imported leanserve.kernels.* by now

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_call(self, item):
            _current_case[0] = f"test {item.nodeid}"
            yield

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", "--rootdir", str(ROOT),
                     *[str(ROOT / p) for p in paths]], plugins=[Plugin()])
    lines = [line for line in log.getvalue().splitlines() if line.strip()]
    return lines[-1] if lines else "(no pytest output)"


def capture(modules, full: bool, tests: list[str], sms: int) -> tuple[list[Job], list[tuple[str, str]]]:
    """Run every launcher case (and the tests); returns the unique compile jobs and the cases that raised."""
    import triton

    jit_cls = triton.runtime.jit.JITFunction
    original = jit_cls._do_compile
    jit_cls._do_compile = _recording_do_compile
    _SMS[0] = sms
    _patch_sms()
    launch_errors = []
    try:
        for name, thunk in _cases(modules, full):
            for pdl in (False, True):
                _current_case[0] = name + (" pdl" if pdl else "")
                _PDL[0] = pdl
                try:
                    thunk()
                except Exception:
                    launch_errors.append((_current_case[0], traceback.format_exc(limit=6)))
        _PDL[0] = False
        if tests:
            before = len(CAPTURED)
            summary = _run_tests(tests)
            print(f"tests {' '.join(tests)}: {len(CAPTURED) - before} launches captured "
                  f"(pytest: {summary}; failures are expected, nothing runs)")
    finally:
        jit_cls._do_compile = original
        for mod, attr, fn in _PATCHED:
            setattr(mod, attr, fn)
        _PATCHED.clear()
    unique: dict[str, Job] = {}
    for job in CAPTURED:
        job.key = repr((job.kernel, sorted(job.signature.items()), sorted(job.constexprs.items(), key=str),
                        sorted(job.attrs.items(), key=str), sorted(job.options.items(), key=str)))
        if job.key in unique:
            unique[job.key].also_cases.append(job.case)  # type: ignore[attr-defined]
        else:
            job.also_cases = []  # type: ignore[attr-defined]
            unique[job.key] = job
    return list(unique.values()), launch_errors


# ---------------------------------------------------------------------------------------------------
# Compile


_JOBS: list[Job] = []
_TARGET = None

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _summary(job: Job) -> str:
    names = job.fn.arg_names
    consts = []
    for path, value in job.constexprs.items():
        name = names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)
        if job.signature.get(name) == "constexpr" and name in names and name.isupper():
            consts.append(f"{name}={value}")
    ones = [names[p[0]] for p, v in job.constexprs.items() if not names[p[0]].isupper()]
    dtypes = sorted({t for t in job.signature.values() if t.startswith("*")})
    text = " ".join(consts) + f" warps={job.options.get('num_warps')} stages={job.options.get('num_stages')}"
    text += f" ptrs={','.join(dtypes)}"
    if ones:
        text += f" (=1: {','.join(ones)})"
    return text


def compile_one(index: int) -> Result:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    job = _JOBS[index]
    summary = _summary(job)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed to stdout
        src = ASTSource(fn=job.fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=_TARGET, options=job.options)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if not str(e).strip() or "CompilationError" not in type(e).__name__:
            text += "\n" + traceback.format_exc(limit=8)
        return Result(job.case, job.kernel, summary, False, time.perf_counter() - start, error=text)
    res = Result(job.case, job.kernel, summary, True, time.perf_counter() - start)
    out = log.getvalue()
    if m := _PTXAS_REGS.search(out):
        res.regs = int(m.group(1))
    if m := _PTXAS_SPILL.search(out):
        res.stack, res.spill_stores, res.spill_loads = map(int, m.groups())
    res.shared = getattr(compiled.metadata, "shared", None)
    if dump_dir := os.environ.get("AOT_DUMP_DIR"):
        stem = os.path.join(dump_dir, f"{job.kernel}_{index:03d}")
        for kind in ("ttgir", "ptx"):
            with open(f"{stem}.{kind}", "w") as f:
                f.write(f"// {summary} | {job.case}\n" if kind == "ttgir" else "")
                f.write(str(compiled.asm.get(kind, "")))
    if "cubin" not in compiled.asm:
        res.ok, res.error = False, "no cubin produced"
    return res


def _cost(job: Job) -> float:
    """Rough compile time, to start the slow ones first: fp32 dots spill and keep ptxas busy longest."""
    blocks = 1
    for path, value in job.constexprs.items():
        name = job.fn.arg_names[path[0]]
        if name.startswith("BLOCK_") and isinstance(value, int):
            blocks *= value
    first_ptr = next((t for t in job.signature.values() if t.startswith("*")), "")
    fp32 = first_ptr == "*fp32"
    return blocks * (8 if fp32 else 1)


def _init_worker(target, cache_dir):
    global _TARGET
    _TARGET = target
    os.environ["TRITON_CACHE_DIR"] = cache_dir


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80")
    parser.add_argument("--full", action="store_true",
                        help="more GROUPs, widths, AWQ shapes and specialisations (a few times more compiles)")
    parser.add_argument("--tests", nargs="*", default=None, metavar="PATH",
                        help="also capture every kernel config these tests launch (default with no PATH: "
                             "tests/kernels, what benchmarks/gpu_session.sh runs compiled); needs pytest")
    parser.add_argument("--sms", type=int, default=132, help="SM count the launchers see (H100 SXM / H200: 132)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="parallel compiles")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the launcher cases of each compile")
    parser.add_argument("--only", default=None, metavar="NAME", help="compile only kernels whose name contains NAME")
    parser.add_argument("--dump", default=None, metavar="DIR",
                        help="write each compile's TTGIR and PTX to DIR (layouts, convert_layout/local_alloc "
                             "round trips through shared memory, load widths: what decides a kernel's speed)")
    parser.add_argument("--awq-gemv", default=None, metavar="JSON",
                        help="also compile these AWQ GEMV launch configs (a JSON list of gemv_config dicts) at "
                             "M=1, 4096x11008 fp16: their registers and shared memory before a GPU sweep")
    parser.add_argument("--int4-gemv", default=None, metavar="JSON",
                        help="also compile these K-major int4 GEMV configs (a JSON list of Int4GemvConfig keyword "
                             "dicts) at M=1 fp16 on the int4 shapes")
    args = parser.parse_args()
    if args.int4_gemv:
        import json

        INT4_GEMV_CONFIGS.extend(json.loads(args.int4_gemv))
    if args.awq_gemv:
        import json

        AWQ_GEMV_CONFIGS.extend(json.loads(args.awq_gemv))
    if args.tests is not None and not args.tests:
        args.tests = ["tests/kernels"]
    args.tests = args.tests or []

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    print(f"triton {triton.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}; "
          f"target cuda sm_{args.arch}")
    backends = getattr(triton.backends, "backends", {})
    if "nvidia" not in backends:
        print(f"CANNOT TARGET CUDA: this triton has no NVIDIA backend (backends: {sorted(backends)})")
        return 2
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(args.arch)
        except TypeError:
            ptxas = get_ptxas()
        print(f"ptxas: {ptxas.path} ({ptxas.version})")
    except Exception as e:
        print(f"CANNOT TARGET CUDA: no usable ptxas for sm_{args.arch}: {type(e).__name__}: {e}")
        return 2

    global _TARGET
    _TARGET = GPUTarget("cuda", args.arch, 32)
    # JITFunction.run asks the active driver for the device, stream and target; no CUDA driver is needed.
    sys.modules["triton.runtime.driver"].driver.set_active(_FakeDriver(_TARGET))

    t0 = time.perf_counter()
    modules = _load_kernels()
    failures = 0
    for name, mod in modules.items():
        if isinstance(mod, Exception):
            print(f"FAIL import kernels/{name}.py: {type(mod).__name__}: {mod}")
            failures += 1
    jobs, launch_errors = capture(modules, args.full, args.tests, args.sms)
    for name, tb in launch_errors:
        print(f"FAIL launcher {name} (raised before reaching a kernel: the launcher changed under this case, "
              f"or it is broken):\n{tb}")
        failures += 1
    launched = _launched_kernels(modules)
    seen = {j.kernel for j in jobs}
    for name, mod_name in sorted(launched.items()):
        if name not in seen:
            print(f"FAIL not covered: {mod_name}.{name} is launched in kernels/ but no case here reaches it "
                  "(add a case to benchmarks/aot_compile_check.py)")
            failures += 1
    print(f"{len(jobs)} distinct compiles from {len(CAPTURED)} launches "
          f"(capture {time.perf_counter() - t0:.1f}s); compiling with {args.jobs} processes...")
    sys.stdout.flush()

    if args.only:
        jobs = [j for j in jobs if args.only in j.kernel]
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        os.environ["AOT_DUMP_DIR"] = os.path.abspath(args.dump)  # read by compile_one in the workers
    global _JOBS
    _JOBS = jobs
    with tempfile.TemporaryDirectory(prefix="aot-triton-cache-") as cache_dir:
        _init_worker(_TARGET, cache_dir)
        if args.jobs > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork"),
                                     initializer=_init_worker, initargs=(_TARGET, cache_dir)) as pool:
                by_cost = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
                results = dict(zip(by_cost, pool.map(compile_one, by_cost, chunksize=1)))
        else:
            results = {i: compile_one(i) for i in range(len(jobs))}

    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].kernel, jobs[i].case))
    worst_spill = 0
    for i in order:
        r, job = results[i], jobs[i]
        if r.ok:
            spill = (r.spill_stores or 0) + (r.spill_loads or 0)
            worst_spill = max(worst_spill, spill)
            flag = "  <-- SPILLS" if spill else ""
            print(f"ok   {r.kernel:26s} regs={r.regs} spill={r.spill_stores}/{r.spill_loads}B "
                  f"stack={r.stack}B shared={r.shared}B {r.seconds:4.1f}s | {r.summary} | {r.case}{flag}")
        else:
            failures += 1
            print(f"FAIL {r.kernel:26s} {r.summary} | {r.case}\n{r.error}")
        if args.verbose and job.also_cases:
            print(f"       same compile: {'; '.join(job.also_cases)}")
    ok = sum(r.ok for r in results.values())
    spilling = [(jobs[i], r) for i, r in results.items() if r.ok and (r.spill_stores or r.spill_loads)]
    fp32 = sum("*fp32" == next((t for t in j.signature.values() if t.startswith("*")), "") for j, _ in spilling)
    print(f"\n{ok}/{len(results)} compiled for sm_{args.arch} under triton {triton.__version__}, "
          f"{failures} failure(s); {len(spilling)} spill ({fp32} of them fp32 inputs), worst "
          f"{worst_spill} B/thread stores+loads; total {time.perf_counter() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
