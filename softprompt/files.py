"""Reading and writing files safely: whole or not at all, and never by unpickling.

Every file softprompt writes goes to a temporary name beside its target and is renamed over it once complete, so a
process killed at any moment leaves the old file or the new one, never half of one. Every file it reads is JSON or
safetensors, checked against the size and SHA-256 recorded beside it where there is a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

TEMPORARY_SUFFIX = ".tmp"
"""What the temporary files of `atomic_write_bytes` end with (``.<name>.<random>.tmp``)."""


_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX) + "$")
"""`atomic_write_bytes`'s temporary names: ``.<name>.`` + mkstemp's 8 random characters + the suffix."""


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one of `atomic_write_bytes`'s temporaries (left behind only by a killed process)."""
    return _TEMPORARY_NAME.match(name) is not None


class AdapterFormatError(ValueError):
    """An adapter directory (softprompt's format or PEFT's) that cannot be loaded: the message names the file and
    what is wrong."""


class BaseModelMismatchError(AdapterFormatError):
    """An adapter made for a base model of another shape than the one it is loaded onto.

    Args:
        message: the whole message (the file, every dimension that differs, the base it was trained on, the fix).
        source: the adapter config file.
        mismatches: one ``"<dimension> <adapter's> (adapter) vs <base's> (base model)"`` entry per dimension.
    """

    def __init__(self, message: str, source: Path, mismatches: list[str]):
        super().__init__(message)
        self.source = source
        """The adapter config file."""
        self.mismatches = mismatches
        """Every dimension that differs, as the message words it."""


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Writes `payload` to a temporary file beside `path`, flushed to disk, then renames it over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        # mkstemp creates the file readable by its owner only; give it the mode an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, document: Any) -> None:
    """`atomic_write_bytes` of an indented JSON document."""
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


def read_json(path: Path, error: type[Exception] = AdapterFormatError, missing_fix: str = "") -> dict[str, Any]:
    """Reads a JSON object, with errors that name the file.

    Args:
        path: the file.
        error: the exception class to raise.
        missing_fix: the sentence that tells what to do when the file is missing.

    Raises:
        error: the file is missing, not JSON, or not a JSON object.
    """
    if not path.is_file():
        raise error(f"{path}: file not found.{' ' + missing_fix if missing_fix else ''}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem}); the file is corrupt.") from None
    if not isinstance(document, dict):
        raise error(f"{path}: expected a JSON object, found {type(document).__name__}.")
    return document


def sha256_of(payload: bytes) -> str:
    """The hex SHA-256 of `payload`."""
    return hashlib.sha256(payload).hexdigest()


def sha256_of_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks (a large file is never held in memory whole)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(
    path: Path,
    expected_bytes: int | None = None,
    expected_sha256: str | None = None,
    error: type[Exception] = AdapterFormatError,
    record: str = "the adapter config",
) -> dict[str, torch.Tensor]:
    """Loads a safetensors file on CPU (never unpickling), checking its recorded size and hash when given.

    Args:
        path: the file.
        expected_bytes: its recorded size, or None.
        expected_sha256: its recorded hex SHA-256, or None.
        error: the exception class to raise.
        record: what recorded the size and hash, for the message.

    Raises:
        error: the file is missing, of another size or hash than recorded, or not readable safetensors.
    """
    if not path.is_file():
        raise error(f"{path}: file not found. Fix: copy the whole directory again.")
    payload = path.read_bytes()
    if expected_bytes is not None and len(payload) != expected_bytes:
        raise error(
            f"{path}: {len(payload)} bytes, but {record} records {expected_bytes}: the file is truncated or was "
            "replaced. Fix: copy it again or save it again."
        )
    if expected_sha256 is not None and sha256_of(payload) != expected_sha256:
        raise error(
            f"{path}: SHA-256 differs from the one {record} records: the file is corrupt or was replaced. Fix: copy "
            "it again or save it again."
        )
    try:
        return safetensors_load(payload)
    except (SafetensorError, OSError, ValueError) as problem:
        raise error(
            f"{path}: not a readable safetensors file ({problem}); it is truncated or corrupt. Fix: copy it again."
        ) from None
