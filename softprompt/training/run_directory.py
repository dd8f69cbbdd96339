"""A run's directory: what it holds, when it may be reused, which checkpoint a resumed run continues from, and the
claim a run holds on it while it runs.

``output_dir/`` holds ``train_config.json`` (the resolved settings), ``metrics.jsonl``, ``curves.png``,
``checkpoints/``, the final ``adapter/`` (or ``adapters/<task>/`` for several), and ``base-model/`` for a run on the
embedded tiny BLOOM. A directory that holds any of these holds a run, whatever state its checkpoints are in, and is
never reused silently: ``--resume`` continues it (with the same settings, but for the fields that cannot change the
numbers), ``--overwrite`` starts it over. ``--resume`` without a usable checkpoint starts from scratch only in a
directory that never had one (a run killed before its first checkpoint); where checkpoints were, it stops.

`claim_run_directory` makes every one of these decisions before anything is written, under the directory's lock
(`softprompt.training.run_lock`), and `RunClaim.begin_writing` is the first write: it clears what ``--overwrite``
replaces and the temporary files and folders that a killed run left behind.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from softprompt.files import atomic_write_json, is_temporary_name
from softprompt.training.base_model import BASE_MODEL_DIR, CONFIG_FILE
from softprompt.training.checkpoint import CHECKPOINTS_DIR, Checkpoint, CheckpointError, load_checkpoint
from softprompt.training.config import ConfigError, TrainConfig, flatten_settings
from softprompt.training.metrics import read_metrics
from softprompt.training.run_lock import RunLock, acquire_run_lock

ADAPTER_DIR = "adapter"
"""The final adapter of a one-adapter run: ``output_dir/adapter``."""
ADAPTERS_DIR = "adapters"
"""The final adapters of a multi-adapter run: ``output_dir/adapters/<task>``."""
RECIPE_DATA_DIR = "data"
"""The data a recipe made for the run (context distillation's conversations and teacher targets): ``output_dir/data``."""
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"

RUN_FILES = (CONFIG_FILE, METRICS_FILE, PLOT_FILE)
RUN_FOLDERS = (ADAPTER_DIR, ADAPTERS_DIR, CHECKPOINTS_DIR, BASE_MODEL_DIR, RECIPE_DATA_DIR)
"""What a run writes into its directory; any of them there means the directory holds a run."""

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TEMPORARY_CHECKPOINT = re.compile(r"^\.tmp-step-\d{8,}-\d+$")
"""`save_checkpoint`'s temporary directories (``.tmp-step-<step>-<pid>``)."""
_BASE_MODEL_STAGING = re.compile(r"^\." + re.escape(BASE_MODEL_DIR) + r"\.[a-z0-9_]{8}$")
"""`softprompt.quickstart.save_tiny_model`'s staging folder beside ``base-model/`` (``.base-model.`` + mkdtemp's 8
random characters)."""

RESUME_FREE_FIELDS = frozenset({"resume", "overwrite", "num_generations", "progress", "keep_last", "save_every",
                                "output_dir"})
"""Fields that may differ between a run and its ``--resume``: they change where output goes or what is printed,
never the numbers the run computes."""
RESUME_PLACEMENT_FIELDS = frozenset({"device", "num_threads"})
"""Fields that say where a run executes. They may change at ``--resume`` too, so that a run can move to another
machine, but they can change floating-point rounding (another device, another split of the BLAS work over
threads): bit-for-bit equality with an uninterrupted run holds only while they stay the same."""

Emit = Callable[..., None]
"""``emit(event, **values)``: reports what the claim found (skipped checkpoints, removed leftovers, ...)."""


# ---------------------------------------------------------------------------------------------------- contents


@dataclass
class RunContents:
    """What a run directory holds, read without changing anything."""

    output_dir: Path
    found: list[str] = field(default_factory=list)
    """The run files and folders present (`RUN_FILES`, `RUN_FOLDERS`), folders with a trailing ``/``."""
    checkpoints: list[Path] = field(default_factory=list)
    """Every ``checkpoints/step-*`` directory, complete or not, oldest first."""
    logged_steps: int = 0
    """Training steps recorded in ``metrics.jsonl``."""
    leftovers: list[Path] = field(default_factory=list)
    """Temporary files and folders that only a killed write leaves behind."""

    @property
    def holds_run(self) -> bool:
        """Whether a run was started here (or its files were put here)."""
        return bool(self.found)

    @property
    def had_checkpoints(self) -> bool:
        """Whether the run got as far as a checkpoint: one is there (usable or not), or the final adapter is (every
        finished run wrote epoch-end checkpoints). Steps logged before a first checkpoint were never saved, so a
        run killed that early may start over."""
        final = any(name.rstrip("/") in (ADAPTER_DIR, ADAPTERS_DIR) for name in self.found)
        return bool(self.checkpoints) or final

    def describe(self) -> str:
        """What the directory holds, in words: ``3 checkpoint(s) (newest step-00000012), adapter/, ...``."""
        parts = []
        if self.checkpoints:
            parts.append(f"{len(self.checkpoints)} checkpoint(s) (newest {self.checkpoints[-1].name})")
        for name in self.found:
            if name == METRICS_FILE:
                parts.append(f"{METRICS_FILE} with {self.logged_steps} training step(s)")
            elif name != f"{CHECKPOINTS_DIR}/" or not self.checkpoints:
                parts.append(name)
        return ", ".join(parts)


def inspect_run_directory(output_dir: Path) -> RunContents:
    """Reads what `output_dir` holds (nothing is changed; a missing directory holds nothing).

    Raises:
        ConfigError: `output_dir` exists and is not a directory.
    """
    contents = RunContents(output_dir=output_dir)
    if not output_dir.exists():
        return contents
    if not output_dir.is_dir():
        raise ConfigError(
            f"output_dir={str(output_dir)!r} is a file: expected a directory, or a path that does not exist yet. "
            "Fix: pass another --output-dir."
        )
    contents.found = [f"{name}/" for name in RUN_FOLDERS if (output_dir / name).is_dir()]
    contents.found += [name for name in RUN_FILES if (output_dir / name).is_file()]
    if (output_dir / METRICS_FILE).is_file():
        contents.logged_steps = sum(record.get("event") == "train" for record in read_metrics(output_dir / METRICS_FILE))
    root = output_dir / CHECKPOINTS_DIR
    if root.is_dir():
        steps = [(int(m.group(1)), path) for path in root.iterdir() if path.is_dir() and (m := _STEP_DIR.match(path.name))]
        contents.checkpoints = [path for _, path in sorted(steps)]
        contents.leftovers += sorted(path for path in root.iterdir() if _TEMPORARY_CHECKPOINT.match(path.name))
    contents.leftovers += sorted(path for path in output_dir.iterdir() if path.is_dir()
                                 and _BASE_MODEL_STAGING.match(path.name))
    folders = [output_dir, output_dir / ADAPTER_DIR, output_dir / BASE_MODEL_DIR, output_dir / RECIPE_DATA_DIR]
    if (output_dir / ADAPTERS_DIR).is_dir():
        folders += sorted(path for path in (output_dir / ADAPTERS_DIR).iterdir() if path.is_dir())
    for folder in folders:
        if folder.is_dir():
            contents.leftovers += sorted(path for path in folder.iterdir() if path.is_file()
                                         and is_temporary_name(path.name))
    return contents


# ---------------------------------------------------------------------------------------------------- deciding


def choose_start(contents: RunContents, config: TrainConfig, emit: Emit) -> Checkpoint | None:
    """Whether the run may use the directory, and the checkpoint it continues from (None: from scratch).

    Args:
        contents: what the directory holds.
        config: the run's settings (``resume``, ``overwrite`` and the settings a checkpoint must match).
        emit: told about damaged checkpoints skipped and a resume without any.

    Raises:
        ConfigError: the directory holds a run and neither ``--resume`` nor ``--overwrite`` was given; ``--resume``
            finds no usable checkpoint in a directory that had some (starting over would throw the run away); or
            the checkpoint was written with other settings. Each message names what was found and the ways on.
    """
    output_dir = config.resolved_output_dir
    if config.output.overwrite:
        return None
    if not config.output.resume:
        if contents.holds_run:
            raise ConfigError(
                f"output_dir={str(output_dir)!r} already holds a run ({contents.describe()}). Fix: pass --resume to "
                "continue it, --overwrite to start over (deleting it), or another --output-dir."
            )
        return None
    skipped: list[tuple[Path, str]] = []
    for directory in reversed(contents.checkpoints):
        try:
            checkpoint = load_checkpoint(directory)
        except CheckpointError as error:
            skipped.append((directory, str(error)))
            continue
        for path, reason in skipped:
            emit("checkpoint_skipped", path=str(path), reason=reason)
        check_same_settings(checkpoint, config)
        return checkpoint
    if contents.had_checkpoints:
        found = "; ".join(f"{path.name}: {reason}" for path, reason in skipped) or "there is no checkpoint"
        raise ConfigError(
            f"--resume: no usable checkpoint in {str(output_dir / CHECKPOINTS_DIR)!r} ({found}). The directory holds "
            f"{contents.describe()}: starting from scratch would throw that away. Fix: repair the checkpoint (copy "
            "its files back from a copy of the run) and --resume again, or start over with --overwrite."
        )
    emit("resume_without_checkpoint", output_dir=str(output_dir))
    return None


def check_same_settings(checkpoint: Checkpoint, config: TrainConfig) -> None:
    """Refuses to continue a checkpoint with other settings than those it was written with (but for the fields
    `RESUME_FREE_FIELDS` and `RESUME_PLACEMENT_FIELDS`).

    Raises:
        ConfigError: listing every setting that differs, with both values.
    """
    saved = _comparable(checkpoint.state.get("config", {}), str(checkpoint.directory))
    current = config.flat()
    free = RESUME_FREE_FIELDS | RESUME_PLACEMENT_FIELDS
    changed = sorted(key for key in current if key not in free and saved.get(key) != current[key])
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
        raise ConfigError(
            f"{checkpoint.directory} was written with other settings ({details}). Fix: resume with the same "
            "settings (the run's train_config.json lists them: --config OUTPUT_DIR/train_config.json --resume), or "
            "start over with --overwrite."
        )


def _comparable(saved: dict[str, Any], source: str) -> dict[str, Any]:
    """A checkpoint's recorded settings, resolved as the current settings are (older checkpoints recorded the flat
    fields unresolved)."""
    try:
        return TrainConfig.from_dict(flatten_settings(saved), source).flat()
    except ValueError:
        return flatten_settings(saved)  # compared as recorded: every difference is then reported by name


# ---------------------------------------------------------------------------------------------------- the claim


@dataclass
class RunClaim:
    """A run's hold on its directory: the decision `claim_run_directory` made, and the lock (rank 0)."""

    output_dir: Path
    contents: RunContents
    checkpoint: Checkpoint | None
    """The checkpoint to continue from; None: from scratch."""
    overwrite: bool
    lock: RunLock | None = None
    created: list[Path] = field(default_factory=list)
    """Directories the claim created (deepest first), removed again if the run fails before writing."""
    writing: bool = False

    def begin_writing(self, emit: Emit) -> None:
        """The run's first write (rank 0): deletes what ``--overwrite`` replaces and what killed writes left.

        Args:
            emit: told which leftovers were removed.
        """
        self.writing = True
        if self.overwrite:
            for name in RUN_FOLDERS:
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
            for name in RUN_FILES:
                (self.output_dir / name).unlink(missing_ok=True)
        leftovers = [path for path in self.contents.leftovers if path.exists()]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if leftovers:
            emit("leftovers_removed", paths=[str(path) for path in leftovers])


@contextlib.contextmanager
def claim_run_directory(config: TrainConfig, emit: Emit) -> Iterator[RunClaim]:
    """Locks the run's directory and decides how the run starts, before anything is written.

    Rank 0 creates the directory if needed, takes its lock (`acquire_run_lock`), reads what it holds and decides
    (`choose_start`); under ``torchrun`` it then tells the other processes the outcome and the checkpoint's step, and
    they read that checkpoint too. On leaving, the lock is released; a run that failed before `RunClaim.begin_writing`
    also removes the directories it created, so a refused or failed run leaves the file system as it found it.

    Args:
        config: the run's settings.
        emit: rank 0's event reporter.

    Yields:
        The `RunClaim`.

    Raises:
        ConfigError: the directory cannot be created, is locked by another run (`RunDirectoryLockedError`), or
            `choose_start` refuses it.
    """
    output_dir = config.resolved_output_dir
    rank = dist.get_rank() if dist.is_initialized() else 0
    claim = None
    try:
        if rank == 0:
            try:
                claim = _claim_as_main(config, output_dir, emit)
            except BaseException:
                _share_outcome(None)
                raise
            _share_outcome(claim)
        else:
            claim = _claim_as_follower(config, output_dir)
        yield claim
    except BaseException:
        if claim is not None and not claim.writing:
            claim_release(claim, remove_created=True)
            claim = None
        raise
    finally:
        if claim is not None:
            claim_release(claim, remove_created=False)


def _claim_as_main(config: TrainConfig, output_dir: Path, emit: Emit) -> RunClaim:
    inspect_run_directory(output_dir)  # a file in the way is refused before any directory is made
    created = _missing_directories(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"output_dir={str(output_dir)!r} cannot be created ({error.strerror}). Fix: pass an --output-dir where "
            "you may write."
        ) from None
    claim = RunClaim(output_dir=output_dir, contents=RunContents(output_dir), checkpoint=None,
                     overwrite=config.output.overwrite, created=created)
    try:
        claim.lock = acquire_run_lock(output_dir)
        claim.contents = inspect_run_directory(output_dir)
        claim.checkpoint = choose_start(claim.contents, config, emit)
    except BaseException:
        claim_release(claim, remove_created=True)
        raise
    return claim


def _claim_as_follower(config: TrainConfig, output_dir: Path) -> RunClaim:
    accepted, step = _share_outcome(None, receive=True)
    if not accepted:
        raise ConfigError(f"output_dir={str(output_dir)!r}: rank 0 refused the run directory (its message says why).")
    checkpoint = load_checkpoint(output_dir / CHECKPOINTS_DIR / f"step-{step:08d}") if step >= 0 else None
    return RunClaim(output_dir=output_dir, contents=RunContents(output_dir), checkpoint=checkpoint,
                    overwrite=config.output.overwrite, writing=True)


def _share_outcome(claim: RunClaim | None, receive: bool = False) -> tuple[bool, int]:
    """Under ``torchrun``, rank 0's outcome (accepted, checkpoint step or -1) for the other processes: two integers
    in a tensor, so that nothing is pickled. Alone, a no-op."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return claim is not None, -1
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    accepted = claim is not None
    step = claim.checkpoint.step if accepted and claim.checkpoint is not None else -1
    outcome = torch.tensor([int(accepted), step], dtype=torch.long, device=device)
    dist.broadcast(outcome, src=0)
    accepted_value, step_value = outcome.tolist()
    return bool(accepted_value), int(step_value)


def claim_release(claim: RunClaim, remove_created: bool) -> None:
    """Releases the lock; with `remove_created`, removes the directories the claim created (if still empty)."""
    if claim.lock is not None:
        claim.lock.release()
        claim.lock = None
    if remove_created:
        for directory in claim.created:
            try:
                directory.rmdir()
            except OSError:  # not empty (or gone): leave it and its parents
                break
        claim.created = []


def _missing_directories(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


# ---------------------------------------------------------------------------------------------------- files


def write_run_config(output_dir: Path, config: TrainConfig) -> None:
    """Writes the resolved settings to ``output_dir/train_config.json`` (atomically)."""
    atomic_write_json(output_dir / CONFIG_FILE, config.to_dict())


def embedded_base_directory(output_dir: Path) -> Path:
    """Where a run on the embedded tiny BLOOM saves it."""
    return (output_dir / BASE_MODEL_DIR).resolve()


def final_adapter_directories(output_dir: Path, names: list[str]) -> dict[str, Path]:
    """Where each final adapter goes: ``adapter/`` for one, ``adapters/<name>/`` for several."""
    if len(names) == 1:
        return {names[0]: output_dir / ADAPTER_DIR}
    return {name: output_dir / ADAPTERS_DIR / name for name in names}
