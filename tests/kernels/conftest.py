"""Kernel tests run the Triton kernels in Triton's CPU interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before triton (or any kernel module) is imported: ``@triton.jit`` picks
the interpreter at decoration time. An explicit TRITON_INTERPRET in the environment wins.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `gpu` tests need compiled kernels on CUDA: the interpreter is too slow for their sizes and does
    # bf16 arithmetic wrongly.
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA with compiled Triton kernels")
    for item in items:
        if "gpu" in item.keywords and HERE in Path(item.path).parents:
            item.add_marker(skip)
