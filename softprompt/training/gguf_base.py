"""A base model stored as one GGUF file (llama.cpp's format): checked, identified by its SHA-256, loaded dense.

transformers reads a ``.gguf`` file with the ``gguf`` package and turns it into an ordinary float model of the
file's architecture, every quantized weight dequantized, and into the file's tokenizer
(``from_pretrained(folder, gguf_file=name)``). A training run on such a base records the file twice: its absolute
path, as the base's name in every adapter it saves (``base_model.name_or_path``), and its SHA-256, as
``model_sha256`` in the run's ``train_config.json``. ``softprompt eval`` and ``generate`` reload the recorded file
and refuse it if its bytes have changed since, so an adapter is never silently evaluated on other weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import transformers

from softprompt.files import sha256_of_file

GGUF_SUFFIX = ".gguf"
"""What a base model's file name ends with (any case) to be read as a GGUF file."""

GGUF_INSTALL = 'pip install "softprompt[gguf]"'
"""The command that installs what loading a GGUF base needs (the ``gguf`` extra)."""

GGUF_PACKAGES = ("gguf", "accelerate")
"""What transformers needs to read a GGUF file: the reader, and accelerate, which its GGUF path requires."""


def is_gguf_file(name_or_path: str | Path) -> bool:
    """Whether a ``--model`` value names a GGUF file (by its suffix; it need not exist)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def require_gguf_support(path: Path) -> None:
    """Checks that a GGUF base can be loaded here: the file exists and the packages its loading needs are installed.

    Args:
        path: the ``.gguf`` file.

    Raises:
        ValueError: the file is missing, or a package is (the message names the extra to install).
    """
    if not path.is_file():
        raise ValueError(
            f"{path}: GGUF file not found. Fix: pass the path of an existing .gguf file, a local model directory, "
            "or a hub id."
        )
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"{path}: loading a .gguf base needs the package(s) {', '.join(missing)}, which are not installed. "
            f"Fix: {GGUF_INSTALL}."
        )


def check_gguf_sha256(path: Path, expected: str | None, recorded_by: str) -> str:
    """The file's SHA-256, checked against a recorded one.

    Args:
        path: the ``.gguf`` file.
        expected: the hex SHA-256 it must have; None: any (only computed).
        recorded_by: who recorded `expected`, for the message (``"the run that trained ADAPTER_DIR"``).

    Returns:
        The file's hex SHA-256.

    Raises:
        ValueError: the file's SHA-256 differs from `expected`: its bytes changed since they were recorded.
    """
    actual = sha256_of_file(path)
    if expected is not None and actual != expected:
        raise ValueError(
            f"{path}: SHA-256 {actual}, but {recorded_by} recorded {expected} (model_sha256): the file has changed "
            "since, so it is not the base the adapter was trained on. Fix: put the original file back at that path, "
            "or pass --model with the base you mean to use."
        )
    return actual


def gguf_model_options() -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` that keep a GGUF base dense.

    transformers releases with ``GgufConfig`` can leave some architectures' weights packed in GGUF blocks (when a
    ggml kernel is installed); ``dequantize=True`` unpacks every weight, and then drops the quantization record, so
    the model is a plain float model that ``save_pretrained`` writes like any other. Earlier releases always
    dequantize and keep no record: nothing to pass.
    """
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {} if gguf_config is None else {"quantization_config": gguf_config(dequantize=True)}
