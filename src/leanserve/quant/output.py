"""Where ``leanserve quantize`` may write, and how a finished checkpoint gets there.

The checkpoint is written to a temporary folder beside ``--out`` (the same filesystem, so moving it in
is a rename) and moved into place only once it is kept: a crash, or a failed quality gate, never leaves
a servable or half-written ``--out`` behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leanserve.quant.awq_format import CHECKPOINT_FILES
from leanserve.quant.validators import UsageError


def is_quantize_output(folder: Path) -> bool:
    """True when ``folder`` holds only what ``quantize`` writes and its config says AWQ.

    Only such a folder may be replaced (with --overwrite): anything else in it could be the user's.
    """
    entries = list(folder.iterdir())
    if not entries or any(e.name not in CHECKPOINT_FILES or not e.is_file() for e in entries):
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "awq"


def check_out_dir(out: Path, src: Path, overwrite: bool) -> None:
    """Raise ``UsageError`` unless a checkpoint can be put at ``out`` without destroying anything."""
    out_r, src_r = out.resolve(), src.resolve()
    if out_r == src_r or out_r.is_relative_to(src_r):
        raise UsageError(f"--out {out} is the source model folder {src} or inside it; choose another folder")
    if src_r.is_relative_to(out_r):
        raise UsageError(f"--out {out} contains the source model {src}; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not is_quantize_output(out):
        raise UsageError(
            f"--out {out} is a non-empty folder that is not a `leanserve quantize` checkpoint; choose a new "
            "or empty folder"
        )
    if not overwrite:
        raise UsageError(f"--out {out} already holds a quantized checkpoint; pass --overwrite to replace it")


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out``, removed on exit unless ``install`` moved it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise UsageError(f"cannot write beside --out {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` by renames; a previous checkpoint there (one that
    ``check_out_dir`` allowed to be replaced) is set aside first and deleted last."""
    old: Path | None = None
    if out.exists() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "checkpoint")
    os.replace(tmp, out)  # an empty folder at ``out`` is replaced by the rename itself
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
