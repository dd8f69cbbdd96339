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
from safetensors import SafetensorError, safe_open

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
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        if error.filename is None:  # a failed write names no file: say which one the caller was writing
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, document: Any) -> None:
    """`atomic_write_bytes` of an indented JSON document."""
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


MAX_JSON_BYTES = 10 * 2**20
"""The largest JSON settings file read (adapter configs, run configs, manifests are a few KB)."""


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
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:  # a settings file is a few KB: never read a large file whole to find that out
        raise error(f"{path}: {size:,d} bytes, not the small JSON settings file expected (at most "
                    f"{MAX_JSON_BYTES:,d}); the file is corrupt or was replaced.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem}); the file is corrupt.") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON: nested too deeply to be a settings file; the file is corrupt.") from None
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


SAFETENSORS_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
"""The floating dtypes an adapter's tensors may have, by their safetensors names."""

_SAFETENSORS_OTHER_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                             "I32": torch.int32, "I64": torch.int64}
"""Other safetensors dtypes, for naming them in messages as torch does."""

_MAX_HEADER_BYTES = 100 * 2**20
"""A safetensors header larger than this is not an adapter's (safetensors itself refuses headers over 100 MB)."""


def safetensors_header(path: Path, size: int, error: type[Exception] = AdapterFormatError) -> dict[str, Any]:
    """The tensors a safetensors file declares (its JSON header), read without reading their data.

    The format is an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and byte range
    in the data that follows), then the data; so the file's size must be exactly 8 + header + the data's end.

    Args:
        path: the file.
        size: its size in bytes (already read with ``stat``).
        error: the exception class to raise.

    Returns:
        Each tensor's header entry (``dtype``, ``shape``, ``data_offsets``), by name; ``__metadata__`` left out.

    Raises:
        error: a header that is not there or not JSON, tensors outside the data, or a size other than the header
            implies (truncated, padded or corrupt).
    """
    with path.open("rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            raise error(f"{path}: not a readable safetensors file (no valid header in its {size} bytes); it is "
                        "truncated or corrupt. Fix: copy it again or save it again.")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise error(f"{path}: not a readable safetensors file (its header is not a JSON object); it is corrupt. Fix: "
                    "copy it again or save it again.")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    ends = []
    for name, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(entry.get("shape"), list)):
            raise error(f"{path}: tensor {name!r} has a malformed header entry; the file is corrupt. Fix: copy it "
                        "again or save it again.")
        ends.append(offsets[1])
    implied = 8 + length + max(ends, default=0)
    if implied != size:
        raise error(f"{path}: {size} bytes, but its header describes {implied}: the file is truncated or corrupt. "
                    "Fix: copy it again or save it again.")
    return tensors


def read_safetensors(
    path: Path,
    expected_bytes: int | None = None,
    expected_sha256: str | None = None,
    error: type[Exception] = AdapterFormatError,
    record: str = "the adapter config",
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
    shape_meanings: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Loads an adapter's safetensors file on CPU, checking everything it can before reading the data.

    In order: the file's size against its record (`expected_bytes`) and against what its header implies; the
    tensors' names, shapes and dtypes against `expected_shapes` (floating dtypes only); then the SHA-256 (read in
    blocks); only then the data, through safetensors' lazy reader; and every value finite. A file truncated,
    padded or swapped is refused without its data being read whole. Never unpickles.

    Args:
        path: the file.
        expected_bytes: its recorded size, or None.
        expected_sha256: its recorded hex SHA-256, or None.
        error: the exception class to raise.
        record: what recorded the size and hash, for the message.
        expected_shapes: the tensors it must hold (exactly these names), with their shapes; None: any.
        shape_meanings: what some expected shapes are, for the message (e.g. ``[num_virtual_tokens, width]``).

    Raises:
        error: naming the file and what is wrong.
    """
    if not path.is_file():
        raise error(f"{path}: file not found. Fix: copy the whole directory again.")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise error(
            f"{path}: {size} bytes, but {record} records {expected_bytes}: the file is truncated or was "
            "replaced. Fix: copy it again or save it again."
        )
    header = safetensors_header(path, size, error)
    for name, entry in header.items():
        if entry.get("dtype") not in SAFETENSORS_FLOAT_DTYPES:
            dtype = _SAFETENSORS_OTHER_DTYPES.get(entry.get("dtype"), entry.get("dtype"))
            raise error(
                f"{path}: tensor {name!r} holds dtype {dtype}: expected finite floating-point weights "
                f"({', '.join(SAFETENSORS_FLOAT_DTYPES)}). Fix: the adapter is damaged or not an adapter; re-save it."
            )
    if expected_shapes is not None:
        for name, shape in expected_shapes.items():
            if name in header and tuple(header[name]["shape"]) != tuple(shape):
                meaning = f"{(shape_meanings or {}).get(name, 'its shape')} = " if shape_meanings else ""
                raise error(f"{path}: {name!r} has shape {tuple(header[name]['shape'])}: expected {meaning}"
                            f"{tuple(shape)} for this config on this base. Fix: the weights and the config come from "
                            "different adapters; re-save the adapter.")
        missing, unexpected = sorted(set(expected_shapes) - set(header)), sorted(set(header) - set(expected_shapes))
        if len(missing) == 1 and not unexpected:
            raise error(f"{path}: the tensor {missing[0]!r} is missing; found {sorted(header)}.")
        if missing or unexpected:
            raise error(f"{path}: tensors do not match {record}: missing {missing}, unexpected {unexpected}. Fix: the "
                        "weights and the config come from different adapters; re-save the adapter.")
    if expected_sha256 is not None and sha256_of_file(path) != expected_sha256:
        raise error(
            f"{path}: SHA-256 differs from the one {record} records: the file is corrupt or was replaced. Fix: copy "
            "it again or save it again."
        )
    try:
        with safe_open(path, "pt") as file:
            tensors = {name: file.get_tensor(name) for name in (expected_shapes or header)}
    except (SafetensorError, OSError, ValueError) as problem:
        raise error(
            f"{path}: not a readable safetensors file ({problem}); it is truncated or corrupt. Fix: copy it again."
        ) from None
    for name, tensor in tensors.items():
        if not bool(tensor.isfinite().all()):
            raise error(
                f"{path}: tensor {name!r} holds NaN or infinite values: expected finite floating-point weights. Fix: "
                "the adapter is damaged or was saved from a run that diverged; re-save it from a good checkpoint."
            )
    return tensors
