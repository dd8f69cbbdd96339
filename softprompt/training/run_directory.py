"""A run's directory: what it holds, when it may be reused, and which checkpoint a resumed run continues from.

``output_dir/`` holds ``train_config.json`` (the resolved settings), ``metrics.jsonl``, ``curves.png``,
``checkpoints/``, the final ``adapter/`` (or ``adapters/<task>/`` for several), and ``base-model/`` for a run on the
embedded tiny BLOOM. A directory that holds a run is never reused silently: ``--resume`` continues it (with the
same settings, but for the fields that cannot change the numbers), ``--overwrite`` starts it over.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softprompt.files import atomic_write_json
from softprompt.training.base_model import BASE_MODEL_DIR, CONFIG_FILE
from softprompt.training.checkpoint import (
    Checkpoint,
    complete_checkpoint_directories,
    latest_checkpoint,
    remove_all_checkpoints,
    remove_temporary_checkpoints,
)
from softprompt.training.config import ConfigError, TrainConfig, flatten_settings

ADAPTER_DIR = "adapter"
"""The final adapter of a one-adapter run: ``output_dir/adapter``."""
ADAPTERS_DIR = "adapters"
"""The final adapters of a multi-adapter run: ``output_dir/adapters/<task>``."""
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"

RESUME_FREE_FIELDS = frozenset({"resume", "overwrite", "num_generations", "progress", "keep_last", "save_every",
                                "output_dir"})
"""Fields that may differ between a run and its ``--resume``: they change where output goes or what is printed,
never the numbers the run computes."""
RESUME_PLACEMENT_FIELDS = frozenset({"device", "num_threads"})
"""Fields that say where a run executes. They may change at ``--resume`` too, so that a run can move to another
machine, but they can change floating-point rounding (another device, another split of the BLAS work over
threads): bit-for-bit equality with an uninterrupted run holds only while they stay the same."""


def prepare_output_dir(output_dir: Path, config: TrainConfig, is_main: bool) -> None:
    """Refuses a directory that holds another run (without ``--resume`` / ``--overwrite``); with ``--overwrite``,
    deletes that run's checkpoints and adapters; removes what a killed checkpoint write left behind.

    Raises:
        ConfigError: the directory holds a run and neither ``--resume`` nor ``--overwrite`` was given.
    """
    existing = complete_checkpoint_directories(output_dir)
    if config.output.overwrite:
        if is_main:  # every process takes this branch; one deletes
            remove_all_checkpoints(output_dir)
            for name in (ADAPTER_DIR, ADAPTERS_DIR):
                shutil.rmtree(output_dir / name, ignore_errors=True)
    elif existing and not config.output.resume:
        raise ConfigError(
            f"output_dir={str(output_dir)!r} already holds a run ({len(existing)} checkpoint(s), newest "
            f"{existing[-1].name}). Fix: pass --resume to continue it, --overwrite to start over, or another "
            "--output-dir."
        )
    if is_main:
        remove_temporary_checkpoints(output_dir)


def write_run_config(output_dir: Path, config: TrainConfig) -> None:
    """Writes the resolved settings to ``output_dir/train_config.json`` (atomically)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / CONFIG_FILE, config.to_dict())


def embedded_base_directory(output_dir: Path) -> Path:
    """Where a run on the embedded tiny BLOOM saves it."""
    return (output_dir / BASE_MODEL_DIR).resolve()


def final_adapter_directories(output_dir: Path, names: list[str]) -> dict[str, Path]:
    """Where each final adapter goes: ``adapter/`` for one, ``adapters/<name>/`` for several."""
    if len(names) == 1:
        return {names[0]: output_dir / ADAPTER_DIR}
    return {name: output_dir / ADAPTERS_DIR / name for name in names}


def resume_checkpoint(
    output_dir: Path, config: TrainConfig, emit: Callable[..., None]
) -> Checkpoint | None:
    """The newest complete checkpoint to continue from, if its settings are the run's.

    Args:
        output_dir: the run's directory.
        config: the settings the run is resumed with.
        emit: reports skipped damaged checkpoints and a resume without any.

    Raises:
        ConfigError: the checkpoint was written with other settings (the message lists them).
    """
    checkpoint = latest_checkpoint(
        output_dir, on_skip=lambda path, error: emit("checkpoint_skipped", path=str(path), reason=str(error))
    )
    if checkpoint is None:
        emit("resume_without_checkpoint", output_dir=str(output_dir))
        return None
    saved = _comparable(checkpoint.state.get("config", {}), str(checkpoint.directory))
    current = config.flat()
    free = RESUME_FREE_FIELDS | RESUME_PLACEMENT_FIELDS
    changed = sorted(key for key in current if key not in free and saved.get(key) != current[key])
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
        raise ConfigError(
            f"{checkpoint.directory} was written with other settings ({details}). Fix: resume with the same "
            "settings (the run's train_config.json lists them), or start over with --overwrite."
        )
    return checkpoint


def _comparable(saved: dict[str, Any], source: str) -> dict[str, Any]:
    """A checkpoint's recorded settings, resolved as the current settings are (older checkpoints recorded the flat
    fields unresolved)."""
    try:
        return TrainConfig.from_dict(flatten_settings(saved), source).flat()
    except ValueError:
        return flatten_settings(saved)  # compared as recorded: every difference is then reported by name
