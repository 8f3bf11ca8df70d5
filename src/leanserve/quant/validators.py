"""Input checks for ``leanserve quantize`` and ``leanserve eval``.

The argparse ``type=`` validators reject a bad flag value at parse time (argparse's one-line error,
exit 2), before any model is loaded; the plain numeric ones are the project's shared set in
``leanserve.cli_types``, and this module adds what only these commands need. Checks that need the
model (its config, its tokenizer) raise ``UsageError``, which the commands turn into the same kind of
one-line error and exit 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from leanserve.cli_types import finite_float, positive_int, ranged


class UsageError(ValueError):
    """A bad input found after parsing: the commands print it as one line and exit 2."""


# A perplexity window scores its last ``window - 1`` tokens, so it needs at least 2.
window_size = ranged(positive_int, lambda v: v >= 2, "at least 2")
# Either end of a split fraction would leave one side empty.
open_fraction = ranged(finite_float, lambda v: 0 < v < 1, "between 0 and 1 (both excluded)")


def group_size(text: str) -> str | int:
    """``auto`` or a positive integer (whether it divides the model's linears is checked later)."""
    return "auto" if text == "auto" else positive_int(text)


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {text}")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"not readable: {text}")
    return path


def model_path(text: str) -> str:
    """A local model: a folder with config.json, or a .gguf file (what ``resolve_model_path`` takes)."""
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return text
    if path.is_file() and path.suffix.lower() == ".gguf":
        return text
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such model folder or .gguf file: {text}")
    raise argparse.ArgumentTypeError(f"neither a model folder (with config.json) nor a .gguf file: {text}")
