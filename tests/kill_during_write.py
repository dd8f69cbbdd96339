"""Test harness (not part of the library): runs ``softprompt train ... --resume`` again and again, each time killing
the process with SIGKILL in the middle of a chosen write.

    python tests/kill_during_write.py KILLS_JSON OUTPUT_DIR TRAIN_FLAG...

KILLS_JSON is a list of kill points, each ``{"call": C, "pattern": REGEX, "nth": N}``: the process kills itself at
the N-th call C whose path matches REGEX (searched in the path):

- ``"replace"``: ``os.replace(source, target)`` (matched against the source), killed before the rename, so the
  temporary file or folder is complete but not in place;
- ``"fsync"``: ``os.fsync(descriptor)`` (matched against the file's path), killed before the data is synced;
- ``"append"``: a write to a file opened with mode ``"ab"`` (counted by writes), killed after half of the bytes
  are written and flushed (a torn line).

softprompt is imported once; each kill point runs in a child made by ``os.fork`` (saving an interpreter start and
the imports per kill), which installs its hook and calls ``softprompt.cli.main``. The library carries no test hook:
the wrapper replaces ``os.replace``, ``os.fsync`` and ``open`` in the child only.

Prints one JSON line: for each kill point, how the child ended (``"killed"``, or its exit status), every path
left under OUTPUT_DIR with its size, and whether ``metrics.jsonl`` ends in a torn line, so that the test can see
what each kill interrupted.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import signal
import sys
from pathlib import Path


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(call: str, pattern: str, nth: int) -> None:
    """Makes the `nth` matching `call` of this process its last."""
    matcher = re.compile(pattern)
    seen = {"count": 0}

    def due(path: str) -> bool:
        if matcher.search(path) is None:
            return False
        seen["count"] += 1
        return seen["count"] == nth

    if call == "replace":
        real_replace = os.replace

        def replace(source, target, *args, **kwargs):
            if due(os.fspath(source)):
                kill_now()
            return real_replace(source, target, *args, **kwargs)

        os.replace = replace
    elif call == "fsync":
        real_fsync = os.fsync

        def fsync(descriptor):
            number = descriptor if isinstance(descriptor, int) else descriptor.fileno()
            if due(os.readlink(f"/proc/self/fd/{number}")):
                kill_now()
            return real_fsync(descriptor)

        os.fsync = fsync
    elif call == "append":
        real_open = builtins.open

        class TornFile:
            def __init__(self, file, path):
                self._file, self._path = file, path

            def write(self, data):
                if not due(self._path):
                    return self._file.write(data)
                self._file.write(data[: len(data) // 2])
                self._file.flush()
                kill_now()

            def __getattr__(self, name):
                return getattr(self._file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._file.__exit__(*exc)

        def opener(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if mode == "ab" and isinstance(file, (str, os.PathLike)) and matcher.search(os.fspath(file)):
                return TornFile(handle, os.fspath(file))
            return handle

        builtins.open = opener
    else:
        raise SystemExit(f"unknown call {call!r}")


def tree(root: Path) -> dict[str, int]:
    """Every file under `root` (relative path -> size) and every folder (-> -1)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def main() -> None:
    kills = json.loads(sys.argv[1])
    output_dir = Path(sys.argv[2])
    flags = sys.argv[3:]
    import softprompt.cli
    import softprompt.training  # noqa: F401  (imported before forking, so that no child pays for it)

    report = []
    for kill in kills:
        child = os.fork()
        if child == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the parent's stdout carries the report only
            install(kill["call"], kill["pattern"], kill["nth"])
            code = softprompt.cli.main(["train", *flags, "--output-dir", str(output_dir), "--resume"])
            os._exit(100 + code)  # not killed: the kill point was never reached
        _, status = os.waitpid(child, 0)
        ended = "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else status
        metrics = output_dir / "metrics.jsonl"
        torn = metrics.is_file() and not metrics.read_bytes().endswith(b"\n")
        report.append({"kill": kill, "ended": ended, "tree": tree(output_dir), "metrics_torn": torn})
        if ended != "killed":
            break
    print(json.dumps(report))


if __name__ == "__main__":
    main()
