"""Our AWQ checkpoints load in transformers (which needs the optional gptqmodel package for AWQ).

Without gptqmodel transformers refuses AWQ checkpoints outright ("Loading an AWQ quantized model
requires gptqmodel"), so this is skipped unless it is installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from leanserve.model.loader import load_model
from leanserve.quant.awq import AWQSettings, calibration_from_text, dense_logits, quantize_model
from leanserve.quant.awq_format import write_checkpoint

if importlib.util.find_spec("gptqmodel") is None:
    pytest.skip("gptqmodel (transformers' AWQ backend) is not installed", allow_module_level=True)


def test_transformers_reads_our_checkpoint(
    tiny_llama: Path, word_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = calibration_from_text(AutoTokenizer.from_pretrained(tiny_llama), word_text, 4, 128)
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32, pack_weights=False)
    tensors = quantize_model(model, calib, AWQSettings(group_size=32, search_tokens=256), progress=False)
    write_checkpoint(tmp_path / "awq", tiny_llama, tensors, 32)

    monkeypatch.setenv("LEANSERVE_AWQ_BACKEND", "reference")
    ours = dense_logits(load_model(tmp_path / "awq", torch.device("cpu"), torch.float32),
                        torch.arange(3, 43).unsqueeze(0))[0]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float16).eval()
    assert "Awq" in type(hf.model.layers[0].self_attn.q_proj).__name__
    with torch.no_grad():
        theirs = hf(torch.arange(3, 43).unsqueeze(0)).logits[0].float()
    scale = ours.abs().max().item()
    assert (ours - theirs).abs().max().item() < 2e-2 * scale  # they compute in fp16
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.9
