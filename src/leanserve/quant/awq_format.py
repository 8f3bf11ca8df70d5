"""AutoAWQ's "GEMM" checkpoint format: int4, per-group along the input dimension, integer zero points.

A quantized linear ``W [out, in]`` is stored as three tensors (see ``leanserve.kernels.awq_reference``
for the exact bit layout): ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/group, out/8]``,
``scales`` fp16 ``[in/group, out]``, with ``W[o, i] = (q - z) * s`` for the group of ``i``. config.json
says so under ``quantization_config``. This is the format AutoAWQ and llm-compressor write and vLLM and
transformers read, so checkpoints go both ways.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from leanserve.kernels.awq_reference import dequantize_awq, pack_awq, unpack_awq

BITS = 4
QMAX = 2**BITS - 1  # 15
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Everything ``write_checkpoint`` may put in a checkpoint folder.
CHECKPOINT_FILES = frozenset({"config.json", "model.safetensors", *TOKENIZER_FILES})
# Checkpoints are shared (a cache, or a container running as another uid): readable by everyone, as the
# GGUF converter leaves its folders. safetensors and mkdtemp would otherwise make them owner-only.
FILE_MODE = 0o644
DIR_MODE = 0o755


def quantization_config(group_size: int) -> dict[str, Any]:
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def check_quantization_config(config: dict[str, Any]) -> int:
    """Validate an AWQ ``quantization_config``; return its group size (-1 means one group per row)."""
    bits = config.get("bits", config.get("w_bit", 4))
    version = str(config.get("version", "gemm")).lower()
    zero_point = config.get("zero_point", True)
    if bits != 4 or version != "gemm" or not zero_point:
        raise NotImplementedError(
            f"AWQ bits={bits} version={version!r} zero_point={zero_point}: only 4-bit GEMM with zero "
            "points is supported"
        )
    return int(config.get("group_size", config.get("q_group_size", 128)))


@dataclass
class QuantizedWeight:
    """One linear's int4 weight in natural layout: ``q [out, in]`` 0..15, ``zeros``/``scales`` ``[out, in/g]``."""

    q: torch.Tensor  # uint8
    zeros: torch.Tensor  # uint8
    scales: torch.Tensor  # fp16
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_size
        z = self.zeros.to(dtype).repeat_interleave(g, dim=1)
        s = self.scales.to(dtype).repeat_interleave(g, dim=1)
        return (self.q.to(dtype) - z) * s

    def to_awq(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors ``qweight``, ``qzeros``, ``scales`` (AWQ is input-major)."""
        return {
            "qweight": pack_awq(self.q.t().contiguous()),
            "qzeros": pack_awq(self.zeros.t().contiguous()),
            "scales": self.scales.t().contiguous().to(torch.float16),
        }

    @classmethod
    def from_awq(
        cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
    ) -> QuantizedWeight:
        return cls(
            unpack_awq(qweight).t().contiguous(),
            unpack_awq(qzeros).t().contiguous(),
            scales.t().contiguous(),
            group_size,
        )


def group_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's asymmetric int4 grid for each group of ``w [out, in]``: fp16 ``scales`` and integer ``zeros``.

    The grid spans [min, max] of the group: ``s = (max - min) / 15``, ``z = round(-min / s)``. The scale
    is rounded to fp16 *before* the zero point and the codes are computed, so that what is searched and
    what is stored are the same numbers.
    """
    out, inp = w.shape
    groups = w.float().reshape(out, inp // group_size, group_size)
    wmax = groups.amax(dim=-1)
    wmin = groups.amin(dim=-1)
    scales = ((wmax - wmin).clamp(min=1e-5) / QMAX).to(torch.float16)
    zeros = (-torch.round(wmin / scales.float())).clamp(0, QMAX)
    return scales, zeros


def quantize_weight(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Round-to-nearest int4 of ``w [out, in]`` on the per-group min/max grid."""
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {inp}")
    scales, zeros = group_params(w, group_size)
    groups = w.float().reshape(out, inp // group_size, group_size)
    q = (torch.round(groups / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, QMAX)
    return QuantizedWeight(
        q.reshape(out, inp).to(torch.uint8), zeros.to(torch.uint8), scales, group_size
    )


def fake_quantize_groups(groups: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize along the last dim (one group per row of it); same numbers as ``quantize_weight``."""
    wmax, wmin = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)
    s = ((wmax - wmin).clamp(min=1e-5) / QMAX).to(torch.float16).float()
    z = (-torch.round(wmin / s)).clamp(0, QMAX)
    return ((torch.round(groups / s) + z).clamp(0, QMAX) - z) * s


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [out, in]`` quantized and dequantized again (fp32): what the int4 model computes with."""
    out, inp = w.shape
    return fake_quantize_groups(w.float().reshape(out, inp // group_size, group_size)).reshape(out, inp)


def dequantize_checkpoint_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Checkpoint tensors -> the fp32 weight in ``nn.Linear`` layout ``[out, in]``."""
    return dequantize_awq(qweight, qzeros, scales, group_size).t().contiguous()


def write_checkpoint(
    out_dir: Path,
    src_dir: Path,
    tensors: dict[str, torch.Tensor],
    group_size: int,
) -> None:
    """Write an AWQ HF folder: config.json (+ quantization_config), model.safetensors, tokenizer files.

    Unquantized tensors are stored in fp16 and ``torch_dtype`` says float16, as AutoAWQ does: vLLM's
    AWQ kernels run in fp16 and pick the dtype from there. (leanserve still runs them in fp32 on CPU.)
    The folder and its files are readable by every user (``DIR_MODE``, ``FILE_MODE``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(group_size)
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"
    stored = {
        name: (t.to(torch.float16) if t.is_floating_point() and t.dtype != torch.float16 else t)
        .contiguous()
        for name, t in tensors.items()
    }
    save_file(stored, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src_dir / name).exists():
            shutil.copy2(src_dir / name, out_dir / name)
    out_dir.chmod(DIR_MODE)
    for name in CHECKPOINT_FILES:
        if (out_dir / name).exists():
            (out_dir / name).chmod(FILE_MODE)
