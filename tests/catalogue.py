"""The machinery of the bad-input catalogues (tests/test_bad_inputs.py, tests/test_hostile_inputs.py): a finished
run each case copies, the case record, the command-line runner, the folder snapshot (every path, with the size and
SHA-256 of every file) taken before and after softprompt refuses the input, and the helpers that damage files while
keeping their records consistent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from softprompt.cli import main

RUN_SETTINGS = dict(split="train[:24]", num_epochs=1, save_every=1, num_generations=0, progress=False)
"""The finished run every case copies: 19 training rows, 3 optimizer steps, checkpoints after steps 2 and 3."""
RUN_FLAGS = ["--split", "train[:24]", "--num-epochs", "1", "--save-every", "1", "--num-generations", "0",
             "--no-progress"]
"""The same settings as flags (a --resume with them continues the run)."""


# ------------------------------------------------------------------------------------------------ the harness


class CommandFailed(Exception):
    """A `softprompt` command that exited with a non-zero status; the message is ``exit N: <stderr>``."""


@dataclass
class Env:
    """What a case works with: its folder, a copy of the finished run in it, the run's base model."""

    root: Path
    run: Path
    base: Any
    monkeypatch: pytest.MonkeyPatch
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def adapter(self) -> Path:
        return self.run / "adapter"

    @property
    def checkpoints(self) -> list[Path]:
        return sorted((self.run / "checkpoints").glob("step-*"))


def cli(*argv: Any) -> None:
    """Runs `softprompt ARGV`; raises `CommandFailed` with its stderr (every case here must fail)."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(arg) for arg in argv])
    raise CommandFailed(f"exit {code}: {errors.getvalue()}")


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under `root`: ``"dir"`` for folders, (size, SHA-256) for files."""
    tree: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():  # recorded as where it points, never followed (a case may make a link loop)
            tree[relative] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            tree[relative] = "dir"
        else:
            payload = path.read_bytes()
            tree[relative] = (len(payload), hashlib.sha256(payload).hexdigest())
    return tree


def write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document))


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads(path.read_text())
    edit(document)
    write_json(path, document)


def rewrite_adapter_weights(directory: Path, payload: bytes) -> None:
    """Replaces an adapter's weights file and records its true size and hash, so that only the content is wrong."""
    (directory / "adapter.safetensors").write_bytes(payload)

    def record(document):
        document["weights"].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())

    edit_json(directory / "adapter_config.json", record)


def rewrite_adapter_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = safetensors_load((directory / "adapter.safetensors").read_bytes())
    edit(tensors)
    rewrite_adapter_weights(directory, safetensors_save(tensors))


def rewrite_checkpoint_file(checkpoint: Path, relative: str, payload: bytes) -> None:
    """Replaces one file of a checkpoint and records its true size and hash in the manifest."""
    (checkpoint / relative).write_bytes(payload)

    def record(manifest):
        manifest["files"][relative] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    edit_json(checkpoint / "manifest.json", record)


def edit_checkpoint_state(checkpoint: Path, edit: Callable[[dict], None]) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    edit(state)
    rewrite_checkpoint_file(checkpoint, "state.json", json.dumps(state).encode())


def damage_every_checkpoint(env: Env) -> None:
    for checkpoint in env.checkpoints:
        with open(checkpoint / "tensors.safetensors", "r+b") as file:
            file.seek(100)
            file.write(b"\x00\x01\x02")


class Unpickled:
    """A pickle that, if anything ever unpickled it, would create the file `path` (the snapshot would show it)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@dataclass
class Case:
    """One bad input: `prepare` makes it (before the snapshot), `act` hands it to softprompt, which must raise
    `error` with a message matching `match` (a regular expression, or a function of the Env giving one)."""

    id: str
    act: Callable[[Env], Any]
    error: type[BaseException]
    match: str | Callable[[Env], str]
    prepare: Callable[[Env], Any] | None = None


class Catalogue:
    """A test module's list of cases, filled by its `case` decorator."""

    def __init__(self) -> None:
        self.cases: list[Case] = []

    def case(self, id: str, error: type[BaseException], match: str | Callable[[Env], str],
             prepare: Callable[[Env], Any] | None = None) -> Callable[[Callable[[Env], Any]], Callable[[Env], Any]]:
        """Registers the decorated function as a case's `act`."""
        def register(act: Callable[[Env], Any]) -> Callable[[Env], Any]:
            self.cases.append(Case(id, act, error, match, prepare))
            return act
        return register


def run_case(bad: Case, finished_run: Path, run_base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepares the case in a copy of the finished run, snapshots the folder, hands the input to softprompt, checks
    the error and its message, and that the folder is as it was."""
    shutil.copytree(finished_run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # whatever a case writes by mistake lands where the snapshot sees it
    env = Env(root=tmp_path, run=tmp_path / "run", base=run_base, monkeypatch=monkeypatch)
    try:
        if bad.prepare is not None:
            bad.prepare(env)
        before = snapshot(tmp_path)
        message = bad.match(env) if callable(bad.match) else bad.match
        with pytest.raises(bad.error, match=message):
            bad.act(env)
        assert snapshot(tmp_path) == before
    finally:
        for release in env.cleanup:
            release()


def train_cli(env: Env, *flags: Any, output_dir: Path | None = None) -> None:
    cli("train", *RUN_FLAGS, "--output-dir", output_dir or env.root / "new", *flags)


def write_file(env: Env, name: str, text: str) -> Path:
    path = env.root / name
    path.write_text(text)
    return path

