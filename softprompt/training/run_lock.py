"""One training process at a time in an output directory.

Two runs writing one directory interleave their metrics, and a ``--resume`` started beside a running run deletes
that run's checkpoint in the making. So a run holds an OS lock, ``fcntl.flock`` on ``output_dir/.softprompt.lock``,
from before it reads the directory until it ends. The kernel releases such a lock when its process ends, however
it ends (``kill -9`` included): a killed run never leaves a stale lock, and the next run takes the lock file over.
The file holds who took the lock (pid, host, start time, command line) for the message another process gets.

The file is deleted when the lock is released, so a finished run leaves nothing behind. A process that opened the
file just before it was deleted would then hold a lock on a file no one else can see; `acquire_run_lock` checks,
once it holds the lock, that its file is still the one at the path, and starts again if not.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.training.config_values import ConfigError

LOCK_FILE = ".softprompt.lock"
"""The lock file in a run's output directory (present only while a run holds it, or after a killed one)."""

_BUSY_RETRIES = 10
_BUSY_WAIT_SECONDS = 0.05
"""A lock found busy is tried again for half a second: a run that is refused holds it only for the instant it
takes to read the directory."""


class RunDirectoryLockedError(ConfigError):
    """Another process holds the output directory's lock; the message names it (pid, host, start time)."""


@dataclass
class RunLock:
    """A held lock on an output directory; `release` gives it up (and deletes the lock file)."""

    path: Path
    """The lock file."""
    descriptor: int
    """The open file the lock is held on."""

    def release(self) -> None:
        """Deletes the lock file, then releases the lock (in that order: see the module docstring)."""
        if self.descriptor < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.descriptor)  # closing the last descriptor releases the flock
            self.descriptor = -1


def acquire_run_lock(output_dir: Path) -> RunLock:
    """Takes the output directory's lock, without waiting for another process to release it.

    Args:
        output_dir: an existing directory.

    Returns:
        The held `RunLock`; its file records this process (pid, host, start time, command line).

    Raises:
        RunDirectoryLockedError: another process holds the lock (the message names it and the fix).
    """
    path = output_dir / LOCK_FILE
    for attempt in range(_BUSY_RETRIES + 1):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if attempt == _BUSY_RETRIES:
                raise RunDirectoryLockedError(_locked_message(output_dir, holder)) from None
            time.sleep(_BUSY_WAIT_SECONDS)
            continue
        if _is_current_file(descriptor, path):
            break
        os.close(descriptor)  # the holder deleted the file as it released it: lock the file now at the path
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    return RunLock(path=path, descriptor=descriptor)


def _is_current_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(descriptor: int) -> dict[str, Any]:
    """What the holder wrote into the lock file (empty if it has not written yet or the file is not JSON)."""
    try:
        document = json.loads(os.pread(descriptor, 4096, 0).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return document if isinstance(document, dict) else {}


def _locked_message(output_dir: Path, holder: dict[str, Any]) -> str:
    pid = holder.get("pid", "?")
    who = (f"pid {pid} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
           + (f" ({holder['command']})" if holder.get("command") else ""))
    return (
        f"output_dir={str(output_dir)!r} is in use by another softprompt run: {who}. Two runs in one directory "
        f"would mix their metrics and checkpoints. Fix: wait for it to end (or stop it: kill {pid}), then continue "
        "it with --resume; or pass another --output-dir."
    )
