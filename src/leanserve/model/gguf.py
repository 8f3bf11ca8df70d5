"""Convert a llama-architecture GGUF file into a Hugging Face model folder (float32 safetensors).

transformers can load GGUF directly, but it dequantizes on every start and (since v5) refuses to
save_pretrained such a model, so we build the folder ourselves once and cache it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the output format changes so cached folders from older converters are rebuilt.
CONVERTER_VERSION = 1
# Written last into every converted folder: records which GGUF file (and which converter) made it.
SOURCE_MARKER = "leanserve_source.json"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class SourceFingerprint:
    """Cheap identity of a GGUF file: a changed size or mtime means the cache must be rebuilt."""

    path: str
    size: int
    mtime_ns: int
    converter_version: int = CONVERTER_VERSION

    @classmethod
    def of(cls, gguf_path: Path) -> SourceFingerprint:
        st = gguf_path.stat()
        return cls(str(gguf_path.resolve()), st.st_size, st.st_mtime_ns)

    @classmethod
    def read(cls, folder: Path) -> SourceFingerprint | None:
        try:
            return cls(**json.loads((folder / SOURCE_MARKER).read_text()))
        except (OSError, ValueError, TypeError):
            return None


@dataclass(frozen=True)
class LlamaHParams:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        # e.g. rope_freqs.weight (llama3 rope scaling): dropping it would silently change the model.
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q_proj/k_proj rows.

    HF Llama applies RoPE with rotate_half: within each head, dim i pairs with dim i + head_dim/2.
    llama.cpp pairs adjacent dims (2i, 2i+1), so its converter regroups each head's rows as
    reshape(n_head, 2, half, ...).swapaxes(1, 2). The inverse is the same swap starting from
    (n_head, half, 2, ...). For k_proj, n_head is the number of KV heads.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(reader: Any) -> dict[str, Any]:
    # Token lists are huge and only needed by the tokenizer, which transformers parses itself.
    return {
        k: f.contents()
        for k, f in reader.fields.items()
        if not k.startswith("tokenizer.ggml.") or k.endswith("_id")
    }


def _f32(x: float) -> float:
    # GGUF stores floats as float32; round-trip through its shortest repr so 1e-5 stays 1e-5.
    return float(str(np.float32(x)))


def read_hparams(meta: dict[str, Any], embedding_rows: int) -> LlamaHParams:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    head_dim = int(meta.get("llama.attention.key_length") or hidden // heads)
    # Older GGUF files omit llama.vocab_size; the embedding matrix is the ground truth anyway.
    vocab = meta.get("llama.vocab_size", embedding_rows)
    return LlamaHParams(
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta["llama.context_length"]),
        vocab_size=int(vocab),
    )


def _load_tensors(reader: Any, hp: LlamaHParams, progress: bool) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        name = hf_tensor_name(t.name)
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, hp.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, hp.num_key_value_heads)
        out[name] = np.ascontiguousarray(w)
    return out


def _config(hp: LlamaHParams, meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(hp),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # transformers 5 reads rope_parameters; older versions and our own code read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": hp.rope_theta},
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
    }


def _save_tokenizer(gguf_path: Path, out: Path, meta: dict[str, Any], hp: LlamaHParams) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = meta.get("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    # Without this the saved tokenizer claims an effectively unbounded context.
    tok.model_max_length = hp.max_position_embeddings
    tok.save_pretrained(str(out))

    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    # transformers 5 records the loading call's own flags; they describe nothing about the tokenizer.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    # "TokenizersBackend" exists only in transformers 5; this name loads the same tokenizer.json in 4.x.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Older transformers only read the template from here, newer ones from chat_template.jinja.
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    _write_json(path, cfg)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an older folder is set aside first, then deleted."""
    old: Path | None = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / "x")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Write config, float32 weights, generation config and tokenizer for `gguf_path` into `out_dir`.

    Everything is built in a temp folder beside `out_dir` and renamed into place at the end, so a
    crash never leaves a half-written folder behind. Returns `out_dir`.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    fingerprint = SourceFingerprint.of(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        reader = GGUFReader(gguf_path)
        meta = _metadata(reader)
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        hp = read_hparams(meta, embedding_rows=int(embd.shape[-1]))
        tensors = _load_tensors(reader, hp, progress)
        tied = "lm_head.weight" not in tensors

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp / "config.json", _config(hp, meta, tied))
        gen = {k: meta.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
        gen["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
        _write_json(tmp / "generation_config.json", gen)
        _save_tokenizer(gguf_path, tmp, meta, hp)
        _write_json(tmp / SOURCE_MARKER, asdict(fingerprint))
        # mkdtemp (and safetensors) create owner-only modes; a shared cache must stay readable.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
