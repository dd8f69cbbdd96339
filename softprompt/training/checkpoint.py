"""Training checkpoints that lose nothing and load without unpickling.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding everything needed to continue a run as if it
had never stopped:

- ``adapters/<name>/``: each adapter in softprompt's format (`SoftPromptModel.save_adapter`);
- ``tensors.safetensors``: the optimizer's state tensors (``optimizer.<param index>.<key>``, e.g. AdamW's
  ``exp_avg``) and the random generators' states as uint8 tensors (``rng.torch``, ``rng.cuda.<device>``);
- ``state.json``: everything else as JSON: the optimizer's param groups and scalar state, the LR scheduler's and
  the fp16 grad scaler's state dicts, Python's and NumPy's random states, the data position (epoch, optimizer
  steps done in that epoch, the epoch's shuffled row order and the seed it came from), the metrics file's length,
  and the run's config;
- ``manifest.json``: the size and SHA-256 of every other file. It is written last.

Writing is atomic: everything goes into a temporary directory that is renamed to ``step-…`` only once complete,
so a process killed at any moment leaves either no checkpoint or a complete one. Loading takes the newest
directory whose manifest exists and whose files match it. Nothing is ever unpickled: tensors come from
safetensors, everything else from JSON (a checkpoint from an untrusted source cannot run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from softprompt.adapter_format import check_format_version
from softprompt.files import atomic_write_bytes

CHECKPOINTS_DIR = "checkpoints"
"""Subdirectory of a run's output directory holding its checkpoints."""

MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
ADAPTERS_DIR = "adapters"
FORMAT_NAME = "softprompt-checkpoint"
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
DAMAGED = "The checkpoint is damaged."


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the run; the message names the file and the fix."""


@dataclass
class Checkpoint:
    """A complete checkpoint found on disk."""

    directory: Path
    """The ``step-…`` directory."""
    step: int
    """Optimizer steps done when it was written."""
    state: dict[str, Any]
    """The parsed ``state.json``."""
    tensors: dict[str, torch.Tensor]
    """The parsed ``tensors.safetensors`` (CPU)."""
    files: frozenset[str] = frozenset()
    """Every file the manifest lists (and that matched it), relative to the directory."""

    def adapter_directory(self, adapter_name: str) -> Path:
        """Where adapter ``adapter_name`` was saved in this checkpoint.

        Raises:
            CheckpointError: the manifest lists no such adapter (a checkpoint of another run, or damaged).
        """
        listed = sorted({Path(name).parts[1] for name in self.files if Path(name).parts[0] == ADAPTERS_DIR})
        if adapter_name not in listed:
            raise CheckpointError(
                f"{self.directory}: holds no adapter {adapter_name!r} (its manifest lists {listed}). The checkpoint "
                "belongs to a run with other adapters, or is damaged. Fix: resume with the run's own settings, or "
                "start over with --overwrite."
            )
        return self.directory / ADAPTERS_DIR / adapter_name


# ---------------------------------------------------------------------------------------------------- writing


def save_checkpoint(
    run_directory: Path,
    step: int,
    save_adapters: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    position: Mapping[str, Any],
    extra: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Writes a checkpoint atomically and deletes all but the newest ``keep_last`` complete checkpoints.

    Args:
        run_directory: the run's output directory (checkpoints go into its ``checkpoints/``).
        step: optimizer steps done; names the directory.
        save_adapters: writes every adapter into the directory it is given (one subdirectory per adapter).
        optimizer: its state dict is split into tensors (safetensors) and everything else (JSON).
        scheduler: its state dict must be JSON-serializable (``LambdaLR`` with plain functions is).
        scaler: the fp16 gradient scaler, or None.
        position: the data position (JSON values).
        extra: more JSON values to keep (config, metrics length, ...).
        keep_last: complete checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    root = run_directory / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    temporary = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        save_adapters(temporary / ADAPTERS_DIR)
        optimizer_tensors, optimizer_json = flatten_optimizer_state(optimizer.state_dict())
        tensors = {**optimizer_tensors, **rng_tensors()}
        atomic_write_bytes(temporary / TENSORS_FILE, safetensors_save(tensors))
        state = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer_json,
            "scheduler": _jsonable(scheduler.state_dict(), "scheduler state"),
            "grad_scaler": _jsonable(scaler.state_dict(), "grad scaler state") if scaler is not None else None,
            "rng": rng_json(),
            "position": dict(position),
            **dict(extra),
        }
        atomic_write_bytes(temporary / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())
        files = sorted(path for path in temporary.rglob("*") if path.is_file())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": {
                str(path.relative_to(temporary)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                for path in files
            },
        }
        # Written last: a directory with a manifest has every file the manifest lists.
        atomic_write_bytes(temporary / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
        _fsync_directory(temporary)
        if final.exists():  # a stale or damaged checkpoint of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in complete_checkpoint_directories(run_directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------- reading


def complete_checkpoint_directories(run_directory: Path) -> list[Path]:
    """The ``step-…`` directories that have a manifest, oldest first."""
    root = run_directory / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def load_checkpoint(directory: Path) -> Checkpoint:
    """Reads and verifies one checkpoint directory.

    Raises:
        CheckpointError: no manifest, a listed file missing or different from the manifest, or unreadable files.
    """
    manifest_path = directory / MANIFEST_FILE
    manifest = _read_json(manifest_path)
    if manifest.get("format") != FORMAT_NAME or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: not a softprompt checkpoint manifest.")
    check_format_version(manifest.get("format_version"), FORMAT_VERSION, manifest_path, CheckpointError,
                         DAMAGED)
    match = _STEP_DIR.match(directory.name)
    step = manifest.get("step")
    if match is None or step != int(match.group(1)) or isinstance(step, bool):
        raise CheckpointError(
            f"{manifest_path}: records step {step!r} in a directory named {directory.name!r}: expected the step of "
            "the name. The checkpoint was renamed or damaged. Fix: give it back its name, or delete it."
        )
    files = manifest["files"]
    for required in (STATE_FILE, TENSORS_FILE):
        if required not in files:
            raise CheckpointError(f"{manifest_path}: does not list {required}, which every checkpoint has. The "
                                  "checkpoint is damaged.")
    for relative, expected in files.items():
        path = directory / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise CheckpointError(f"{manifest_path}: lists {relative!r}, a path outside the checkpoint. The "
                                  "checkpoint is damaged or was tampered with.")
        if not isinstance(expected, dict) or not _is_count(expected.get("bytes")) or not _is_sha256(
                expected.get("sha256")):
            raise CheckpointError(f"{manifest_path}: the record of {relative!r} ({expected!r}) lacks a size and a "
                                  "SHA-256. The checkpoint is damaged.")
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing. The checkpoint is damaged.")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: size or SHA-256 differs from the manifest. The checkpoint is damaged.")
    state = _read_json(directory / STATE_FILE)
    try:
        tensors = safetensors_load((directory / TENSORS_FILE).read_bytes())
    except Exception as error:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{directory / TENSORS_FILE}: unreadable safetensors ({error}).") from None
    check_state(state, tensors, step, directory / STATE_FILE)
    return Checkpoint(directory=directory, step=step, state=state, tensors=tensors, files=frozenset(files))


def check_state(state: dict[str, Any], tensors: Mapping[str, torch.Tensor], step: int, path: Path) -> None:
    """Checks every field a resumed run reads from ``state.json`` (and the random state in the tensors).

    Raises:
        CheckpointError: naming the first field that is missing or of the wrong kind.
    """
    check_format_version(state.get("format_version"), FORMAT_VERSION, path, CheckpointError, DAMAGED)
    optimizer, rng = state.get("optimizer"), state.get("rng")
    position = state.get("position") if isinstance(state.get("position"), dict) else {}
    order = position.get("order")
    checks = [  # (field, its value, whether it is valid, what was expected)
        ("format", state.get("format"), state.get("format") == FORMAT_NAME, repr(FORMAT_NAME)),
        ("step", state.get("step"), state.get("step") == step, f"{step}, the manifest's step"),
        ("position", state.get("position"), isinstance(state.get("position"), dict), "an object"),
        ("position.epoch", position.get("epoch"), _is_count(position.get("epoch")), "a count"),
        ("position.step_in_epoch", position.get("step_in_epoch"), _is_count(position.get("step_in_epoch")),
         "a count"),
        ("position.global_step", position.get("global_step"), position.get("global_step") == step, str(step)),
        ("position.order", order, isinstance(order, list) and all(_is_count(index) for index in order),
         "a list of row indices"),
        ("metrics_bytes", state.get("metrics_bytes"), _is_count(state.get("metrics_bytes")), "a byte count"),
        ("config", state.get("config"), isinstance(state.get("config"), dict), "the run's settings as an object"),
        ("optimizer", optimizer, isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list),
         "an object with param_groups"),
        ("scheduler", state.get("scheduler"), isinstance(state.get("scheduler"), dict), "an object"),
        ("rng", rng, isinstance(rng, dict) and {"python", "numpy"} <= set(rng),
         "an object with the python and numpy states"),
    ]
    for field_name, value, valid, expected in checks:
        if not valid:
            raise CheckpointError(f"{path}: {field_name} is {_short(value)}: expected {expected}. The checkpoint is "
                                  "damaged.")
    rng_state = tensors.get("rng.torch")
    if rng_state is None or rng_state.dtype != torch.uint8:
        raise CheckpointError(f"{path.parent / TENSORS_FILE}: no uint8 'rng.torch' tensor. The checkpoint is damaged.")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def latest_checkpoint(run_directory: Path, on_skip: Callable[[Path, Exception], None] | None = None) -> Checkpoint | None:
    """The newest complete checkpoint that verifies, or None.

    Args:
        run_directory: the run's output directory.
        on_skip: told about each newer checkpoint skipped because it does not verify.
    """
    for directory in reversed(complete_checkpoint_directories(run_directory)):
        try:
            return load_checkpoint(directory)
        except (CheckpointError, KeyError, ValueError) as error:
            if on_skip is not None:
                on_skip(directory, error)
    return None


def restore_training_state(
    checkpoint: Checkpoint,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Loads optimizer, scheduler, grad scaler and random states from ``checkpoint`` (adapters are loaded by the
    caller, which owns the model)."""
    optimizer.load_state_dict(unflatten_optimizer_state(checkpoint.tensors, checkpoint.state["optimizer"]))
    scheduler.load_state_dict(checkpoint.state["scheduler"])
    if scaler is not None and checkpoint.state.get("grad_scaler") is not None:
        scaler.load_state_dict(checkpoint.state["grad_scaler"])
    restore_rng(checkpoint.tensors, checkpoint.state["rng"])


# ---------------------------------------------------------------------------------------------------- optimizer


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into tensors (for safetensors) and JSON values.

    Returns:
        (``{"optimizer.<param index>.<key>": tensor}``, ``{"param_groups": [...], "scalars": {index: {key:
        value}}}``).

    Raises:
        CheckpointError: a value that is neither a tensor nor JSON-serializable.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, parameter_state in state_dict["state"].items():
        for key, value in parameter_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{int(index)}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(int(index)), {})[key] = _jsonable(value, f"optimizer state {key!r}")
    groups = [_jsonable(dict(group), "optimizer param group") for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuilds the ``optimizer.state_dict()`` that `flatten_optimizer_state` split."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in document.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in document["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):  # JSON has no tuples; torch's optimizers store betas as one
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------- random states


def rng_tensors() -> dict[str, torch.Tensor]:
    """torch's CPU and CUDA generator states, as uint8 tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = state
    return tensors


def rng_json() -> dict[str, Any]:
    """Python's and NumPy's generator states, as JSON values."""
    version, internal, gauss_next = random.getstate()
    name, keys, index, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, [int(key) for key in keys], int(index), int(has_gauss), float(cached_gaussian)],
    }


def restore_rng(tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> None:
    """Sets every generator back to the state `rng_tensors` / `rng_json` recorded."""
    torch.set_rng_state(tensors["rng.torch"])
    num_cuda_devices = sum(1 for key in tensors if key.startswith("rng.cuda."))
    cuda_states = [tensors[f"rng.cuda.{d}"] for d in range(num_cuda_devices)]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss_next = document["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, index, has_gauss, cached_gaussian = document["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), index, has_gauss, cached_gaussian))


# ---------------------------------------------------------------------------------------------------- helpers


def _jsonable(value: Any, what: str) -> Any:
    """``value`` with tuples as lists, checked to survive a JSON round trip."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item, what) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, what) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise CheckpointError(
        f"{what}: value {value!r} of type {type(value).__name__} cannot be stored as JSON. Fix: use an optimizer / "
        "scheduler whose state holds tensors and plain numbers (AdamW with LambdaLR does)."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing. The checkpoint is incomplete.")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}). The checkpoint is damaged.") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a JSON object. The checkpoint is damaged.")
    return document


def _fsync_directory(path: Path) -> None:
    """Makes a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


__all__ = [
    "CHECKPOINTS_DIR",
    "Checkpoint",
    "CheckpointError",
    "complete_checkpoint_directories",
    "flatten_optimizer_state",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_training_state",
    "save_checkpoint",
    "unflatten_optimizer_state",
]
