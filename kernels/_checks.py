"""Argument checks shared by the Triton launchers.

Triton kernels take raw pointers: a wrong dtype, a mismatched shape or a block id past the end of the
cache reads or writes foreign memory instead of failing (and the interpreter does not catch it either).
Every launcher therefore validates its arguments here first and raises ``ValueError`` naming the
problem. Checks come in two kinds:

- metadata checks (shape, dtype, device, strides): free, always run;
- value checks (index bounds inside int tensors): they need one host sync, so they are skipped while a
  CUDA graph is being captured and inside ``trusted_inputs()`` (the model runner, whose metadata
  comes from the block manager: a sync per kernel per layer cost a 1B model's eager step more than
  its kernels), can be turned off with ``LEANSERVE_KERNEL_CHECKS=0``, and are memoised per index
  tensor so that the layers of one step (same tensors, unmodified) pay for them once.

The kernels also clamp every index they load, so a skipped check can give wrong numbers but never an
out-of-bounds access.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # one [heads, head_dim] tile per program must fit in registers

# Per kind of call, the last validated index tensors: (weak refs, version counters, scalars checked).
_memo: dict[str, tuple[tuple, tuple, tuple]] = {}


def fail(message: str) -> None:
    raise ValueError(message)


def check_power_of_two(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        fail(f"{name} must be a power of two, got {value}")


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        fail(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.numel() and t.stride(-1) != 1:
        fail(f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}")


def check_index(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != ndim:
        fail(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        fail(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        fail(f"all tensors must be on one device, got {devices}")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check_float("k_cache", k_cache, 4)
    check_float("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        fail(
            f"k_cache and v_cache must match: {tuple(k_cache.shape)} {k_cache.dtype} vs "
            f"{tuple(v_cache.shape)} {v_cache.dtype}"
        )
    if k_cache.shape[-1] > MAX_HEAD_DIM:
        fail(f"head_dim {k_cache.shape[-1]} is above the supported {MAX_HEAD_DIM}")


def check_attention_meta(
    query: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> None:
    """Shapes shared by decode and prefill: query heads vs cache heads, table and length vectors."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if query.dtype != k_cache.dtype:
        fail(f"query dtype {query.dtype} must equal the cache dtype {k_cache.dtype}")
    if head_dim != k_cache.shape[3]:
        fail(f"query head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        fail(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    check_index("block_tables", block_tables, 2, (torch.int32,))
    check_index("context_lens", context_lens, 1, (torch.int32,))
    if context_lens.shape[0] != block_tables.shape[0]:
        fail(f"context_lens has {context_lens.shape[0]} rows, block_tables {block_tables.shape[0]}")


_trust = threading.local()


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the value checks of launches made in this block, on this thread."""
    previous = getattr(_trust, "on", False)
    _trust.on = True
    try:
        yield
    finally:
        _trust.on = previous


def value_checks_enabled() -> bool:
    if os.environ.get("LEANSERVE_KERNEL_CHECKS", "1") == "0" or getattr(_trust, "on", False):
        return False
    # A host sync inside CUDA graph capture is an error; captured steps are validated when run eagerly.
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors keep no version counter: never memoise them
        return None


def already_validated(kind: str, tensors: tuple[torch.Tensor, ...], scalars: tuple) -> bool:
    """True when these very tensors, unmodified since, passed the same checks last time."""
    if kind not in _memo:
        return False
    refs, versions, memo_scalars = _memo[kind]
    if memo_scalars != scalars or len(refs) != len(tensors):
        return False
    if any(ref() is not t for ref, t in zip(refs, tensors, strict=True)):
        return False
    current = _versions(tensors)
    return current is not None and current == versions


def remember_validated(kind: str, tensors: tuple[torch.Tensor, ...], scalars: tuple) -> None:
    versions = _versions(tensors)
    if versions is None:
        _memo.pop(kind, None)
    else:
        _memo[kind] = (tuple(weakref.ref(t) for t in tensors), versions, scalars)


def raise_if(condition: torch.Tensor, message: Callable[[], str]) -> None:
    """One host sync: raise when the device-side boolean ``condition`` is true.

    The message is built lazily: it reads offending values back, which costs more syncs.
    """
    if bool(condition):
        fail(message())


def check_table_values(
    block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, block_size: int
) -> None:
    """Context lengths fit the table, and every table entry a sequence uses names a real block.

    Entries past a sequence's context are never read, so they may hold anything (e.g. -1 padding).
    """
    max_blocks = block_tables.shape[1]
    if context_lens.numel() == 0:
        return
    capacity = max_blocks * block_size
    bad_len = (context_lens < 0) | (context_lens > capacity)
    used_blocks = (context_lens.long().clamp(0, capacity) + block_size - 1) // block_size
    used = torch.arange(max_blocks, device=block_tables.device)[None, :] < used_blocks[:, None]
    bad_id = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if not bool(bad_len.any() | bad_id.any()):  # the one sync of the success path
        return
    if bool(bad_len.any()):
        fail(
            f"context_lens must lie in [0, max_blocks * block_size = {capacity}], "
            f"got {context_lens[bad_len][:8].tolist()}"
        )
    fail(
        f"block_tables holds block ids outside [0, num_blocks = {num_blocks}) within the context, "
        f"e.g. {block_tables[bad_id][:8].tolist()}"
    )
