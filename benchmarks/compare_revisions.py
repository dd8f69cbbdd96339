r"""The CPU training step of two revisions of softprompt, alternated on one machine: did a change move the figures?

Commands (from the repository root); they produced the committed results (file stem after ``#``):

    python benchmarks/compare_revisions.py --base 287dd6d --rounds 3 --repeats 5   # compare_revisions_cpu_287dd6d
    python benchmarks/compare_revisions.py --base 93978b2 --configs cpu cpu-qwen2.5 --rounds 3 --repeats 5
        # compare_revisions_cpu_93978b2, compare_revisions_cpu-qwen2.5_93978b2
    python benchmarks/compare_revisions.py --base bafc5f9 --head bafc5f9 --rounds 3 --repeats 5
        # compare_revisions_cpu_bafc5f9: the code after the engine against itself

Each revision is checked out into a temporary git worktree, and each round runs that worktree's own
``benchmarks/train_step.py --configs CONFIG`` in a fresh process, base then head, so that a slow drift of a shared
machine hits both alike. ``PYTHONPATH`` holds a folder with one link, ``softprompt`` to the worktree's package, so
``import softprompt`` is that revision's package (checked before the first round), and nothing else of the
worktree's root is importable: revisions before 659e3da have a root ``kernels/`` package, which would shadow the
PyPI package ``kernels`` that transformers 5.25 imports. ``softprompt.kernels`` is the installed one, which the CPU
config's ``torch`` loss does not use. Each round's medians are read from the result file the run writes in its
worktree, so nothing under this checkout's ``benchmarks/results/`` is touched except this script's own result.

Reported per method: softprompt's median step time in every round for each revision, the median over rounds,
head / base, and where head's median lies against base's range over the rounds (the run-to-run spread): inside,
below (faster) or above (slower); PEFT's median over rounds beside it, as the check that the machine was the same
for both, and head / base once more with each run's time taken over PEFT's in that run (a drift of the machine
between runs cancels). ``--base`` and ``--head`` may name one commit: the same code against itself shows the spread
the comparison can resolve. ``--from-results`` rewrites the tables from result files' stored per-run medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

REPOSITORY = Path(__file__).resolve().parent.parent


def add_worktree(revision: str, folder: Path) -> Path:
    """Checks ``revision`` out into ``folder`` (detached) and returns the folder."""
    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", "--quiet", str(folder), revision],
                   check=True)
    return folder


def import_folder(tree: Path) -> Path:
    """A folder beside ``tree`` whose only entry links ``softprompt`` to the tree's package."""
    folder = tree.with_name(tree.name + "-import")
    if not folder.exists():
        folder.mkdir()
        (folder / "softprompt").symlink_to(tree / "softprompt", target_is_directory=True)
    return folder


def environment_for(tree: Path) -> dict[str, str]:
    """The environment in which ``import softprompt`` is the package of ``tree`` (and nothing else of its root)."""
    return {**os.environ, "PYTHONPATH": str(import_folder(tree))}


def check_imports_from(tree: Path) -> None:
    """Raises if ``import softprompt`` in ``tree``'s environment would not be ``tree``'s package."""
    # From the link's folder: ``python -c`` puts its working directory first on sys.path, and the tree's root may
    # hold an old ``kernels/`` package.
    found = subprocess.run([sys.executable, "-c", "import softprompt; print(softprompt.__file__)"],
                           cwd=import_folder(tree), env=environment_for(tree), check=True, capture_output=True,
                           text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"in {tree}, 'import softprompt' gives {found}, not the worktree's package")


def run_step_benchmark(tree: Path, config: str, repeats: int) -> dict[tuple[str, str], float]:
    """Runs ``tree``'s own train_step.py once and returns its median step time per (method, library)."""
    subprocess.run([sys.executable, "benchmarks/train_step.py", "--configs", config, "--repeats", str(repeats)],
                   cwd=tree, env=environment_for(tree), check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((tree / f"benchmarks/results/train_step_{config}.json").read_text())["rows"]
    return {(row["method"], row["library"]): row["step s (median)"] for row in rows}


def main() -> None:
    """Alternates the two revisions' step benchmarks and writes the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="the revision before the change (a commit, tag or branch); required")
    parser.add_argument("--head", default="HEAD", help="the revision after it (default: HEAD)")
    parser.add_argument("--configs", nargs="*", default=["cpu"], choices=list(harness.STEP_CONFIGS),
                        help="train_step.py configs to compare (CPU ones); default: cpu")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each revision, alternated")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per run (train_step.py --repeats)")
    parser.add_argument("--from-results", nargs="+", type=Path, metavar="JSON",
                        help="instead of running: rewrite these results' tables from their stored per-run medians")
    args = parser.parse_args()
    if args.from_results:
        for path in args.from_results:
            rewrite_from_results(path)
        return
    if args.base is None:
        parser.error("--base is required: the revision before the change (or --from-results)")
    command = "python " + shlex.join(sys.argv)
    machine = harness.machine_info("cpu")  # the load average before the runs; write_results adds the one after
    base_commit, head_commit = (
        subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "--short", revision], check=True,
                       capture_output=True, text=True).stdout.strip() for revision in (args.base, args.head))

    with tempfile.TemporaryDirectory(prefix="compare_revisions_") as scratch:
        trees = {"base": add_worktree(base_commit, Path(scratch) / "base"),
                 "head": add_worktree(head_commit, Path(scratch) / "head")}
        try:
            for tree in trees.values():
                check_imports_from(tree)
            medians: dict[str, dict[str, list[dict[tuple[str, str], float]]]] = {
                config: {"base": [], "head": []} for config in args.configs}
            for round_index in range(args.rounds):
                for config in args.configs:
                    for which, tree in trees.items():
                        medians[config][which].append(run_step_benchmark(tree, config, args.repeats))
                        print(f"{config}, round {round_index + 1}, {which}: " + ", ".join(
                            f"{method} {seconds:.3f} s" for (method, library), seconds
                            in medians[config][which][-1].items() if library == "softprompt"), flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(tree)],
                               check=False)
    for config in args.configs:
        write_comparison(config, medians[config], base_commit, head_commit, args.rounds, args.repeats, machine,
                         command)


def rewrite_from_results(path: Path) -> None:
    """Rewrites one comparison's result files from the per-run medians its JSON stores, with its machine and
    command (a change of the table's columns needs no new runs)."""
    stored = json.loads(path.read_text())
    medians = {which: [{tuple(key.split(" | ")): seconds for key, seconds in result.items()} for result in results]
               for which, results in stored["medians"].items()}
    config = stored.get("config", "cpu")  # results written before the key existed compared the default config
    write_comparison(config, medians, stored["base"], stored["head"], stored["rounds"], stored["repeats"],
                     stored["machine"], stored["command"])


def against_range(median: float, rounds: list[float]) -> str:
    """Where `median` lies against the range of `rounds`: ``inside``, ``below (faster)`` or ``above (slower)``."""
    if median < min(rounds):
        return "below (faster)"
    return "above (slower)" if median > max(rounds) else "inside"


def write_comparison(config: str, medians: dict[str, list[dict[tuple[str, str], float]]], base_commit: str,
                     head_commit: str, rounds: int, repeats: int, machine: dict, command: str) -> None:
    """One config's table: each revision's rounds, medians, and where head lies against base's range."""
    rows = []
    for method, library in medians["base"][0]:
        if library != "softprompt":
            continue
        base_rounds = [result[(method, library)] for result in medians["base"]]
        head_rounds = [result[(method, library)] for result in medians["head"]]
        base_median, head_median = statistics.median(base_rounds), statistics.median(head_rounds)
        # Each run's time over PEFT's in the same run: what a drift of the machine between runs leaves out.
        against_peft = {which: statistics.median(result[(method, "softprompt")] / result[(method, "PEFT")]
                                                 for result in medians[which]) for which in ("base", "head")}
        rows.append({  # columns named base / head: the two may be one commit (a check of the spread itself)
            "method": method,
            f"base {base_commit} per round s": ", ".join(f"{s:.3f}" for s in base_rounds),
            f"head {head_commit} per round s": ", ".join(f"{s:.3f}" for s in head_rounds),
            "base s": base_median,
            "head s": head_median,
            "head / base": head_median / base_median,
            "head against base's range": against_range(head_median, base_rounds),
            "PEFT s (base runs, head runs)": ", ".join(
                f"{statistics.median(result[(method, 'PEFT')] for result in medians[which]):.2f}"
                for which in ("base", "head")),
            "head / base, each over PEFT in its run": against_peft["head"] / against_peft["base"],
        })
    table = harness.markdown_table(rows)
    print(table)
    setup = harness.STEP_CONFIGS[config]
    harness.write_results(
        f"compare_revisions_{config}_{base_commit}",
        rows,
        machine,
        table + f"\n\nsoftprompt's median step time (train_step.py --configs {config} --repeats {repeats}: "
        f"{setup.get('label', setup['model'])} shape cut to {setup['num_layers']} layers, fp32, batch "
        f"{setup['batch_size']} x {setup['num_tokens']}) of {base_commit} (base) and {head_commit} (head), "
        f"{rounds} alternated runs each; the columns per round list each run's median.",
        extra={"base": base_commit, "head": head_commit, "config": config, "rounds": rounds,
               "repeats": repeats,
               "medians": {which: [{f"{m} | {lib}": s for (m, lib), s in result.items()} for result in results]
                           for which, results in medians.items()}},
        command=command,
    )


if __name__ == "__main__":
    main()
