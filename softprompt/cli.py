"""The ``softprompt`` command: a thin layer over the library (it parses flags, calls, and prints).

Subcommands: ``train`` (train a soft prompt; with no flags, the embedded offline default), ``eval`` (loss,
perplexity and accuracy of saved adapters), ``generate`` (text from saved adapters), ``params`` (parameter counts on
the meta device). Run ``softprompt SUBCOMMAND --help``.

The ``train`` flags are made from the fields of `TrainConfig` and its sections and of every method's config
(`softprompt.cli_flags`): a flag is its field's name with dashes, its help the field's docstring, its choices the
field's ``Literal`` type.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softprompt.cli_flags import add_field_flags, add_method_flags
from softprompt.methods import method_named, method_of
from softprompt.methods.multitask_prompt_tuning import task_ids_of
from softprompt.params import SEED_CONFIGS, base_model_config, counts_text, parameter_counts
from softprompt.training.config import (
    METHOD_NAMES,
    SECTIONS,
    TrainConfig,
    flatten_settings,
    merge_settings,
)
from softprompt.training.config_values import read_config_file
from softprompt.training.sections import Device


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``softprompt train``: one flag per setting, grouped as in `TrainConfig`."""
    parser = subparsers.add_parser(
        "train",
        help="train a soft prompt (no flags: the embedded offline default, about a minute on a laptop CPU)",
        description="Train a soft-prompt adapter on a frozen base model. With no flags: a tiny random BLOOM built "
        "locally, the shipped complaints dataset, prompt tuning; prints where the adapter, metrics and plot went. "
        "Settings come from the defaults, then --config FILE, then the flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="seed recipe (hub access): softprompt train --model bigscience/bloomz-560m --dataset ought/raft "
        "--dataset-config twitter_complaints --text-column 'Tweet text' --label-column text_label --method "
        "prompt-tuning --num-epochs 50\n"
        "several processes: torchrun --nproc_per_node 2 -m softprompt.cli train ... (--fsdp: the base sharded over "
        "them)",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON file of settings (field names, flat "
                        "or nested by section); flags override it")
    seen: set[str] = set()
    model = parser.add_argument_group("model and method")
    model.add_argument("--model", dest="model", default=argparse.SUPPRESS,
                       help="hub id, local directory or local .gguf file (dequantized) of a supported family; "
                       "omitted: the embedded tiny BLOOM")
    model.add_argument("--model-sha256", dest="model_sha256", default=argparse.SUPPRESS,
                       help="SHA-256 the .gguf file must have; omitted: the run records the file's own")
    model.add_argument("--method", dest="method", default=argparse.SUPPRESS, choices=METHOD_NAMES,
                       help="soft-prompt method (default: prompt-tuning)")
    seen |= {"model", "model_sha256", "method"}
    add_method_flags(model, seen)
    for name, section in SECTIONS.items():
        add_field_flags(parser.add_argument_group(name), section, seen)
    parser.set_defaults(run=run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags."""
    flags = {name: value for name, value in vars(args).items() if name in TrainConfig.field_names()}
    values = read_config_file(args.config) if args.config is not None else {}
    return TrainConfig.from_dict(merge_settings(values, flags), str(args.config or "flags"))


def add_params_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``softprompt params``: parameter counts in PEFT's wording, on the meta device."""
    parser = subparsers.add_parser(
        "params",
        help="print trainable / all parameter counts (meta device: nothing loaded or downloaded)",
        description="Print trainable and total parameter counts for soft-prompt adapters on a base model, in "
        "PEFT's wording. Without --method, prints the seed guides' configurations.",
    )
    parser.add_argument(
        "--model",
        default="bigscience/bloomz-560m",
        help="a real model known offline (BLOOM, Llama-3.2-1B, Qwen2.5-0.5B, Qwen3-0.6B, Mistral-7B-v0.1, "
        "gemma-2-2b, gemma-3-1b-pt, Phi-3-mini-4k-instruct, gpt2, opt-350m, pythia-410m), a local model directory, "
        "or a hub id (default: %(default)s)",
    )
    parser.add_argument("--method", choices=METHOD_NAMES, help="count one config")
    add_method_flags(parser, {"model", "method"})
    parser.set_defaults(run=run_params)


def run_params(args: argparse.Namespace) -> int:
    """Prints one count line per configuration; returns the exit status."""
    if args.method is None:
        configs = dict(SEED_CONFIGS)
    else:
        spec = method_named(args.method)
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(spec.config_class) if hasattr(args, f.name)}
        if spec.default_num_virtual_tokens is not None:
            fields.setdefault("num_virtual_tokens", spec.default_num_virtual_tokens)
        configs = {args.method: spec.config_class(**fields)}
    print(counts_text(args.model, parameter_counts(base_model_config(args.model), configs)))
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _quiet_libraries() -> None:
    """transformers' save bars and datasets' load bars would interleave with ours."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _format_eval(record: dict[str, Any]) -> str:
    text = f"loss {record['loss']:.4f}"
    if record.get("perplexity") is not None:
        text += f", perplexity {record['perplexity']:.2f}"
    if record.get("accuracy") is not None:
        text += f", accuracy {record['accuracy']:.3f}"
    if record.get("rank_accuracy") is not None:
        text += f", rank accuracy {record['rank_accuracy']:.3f}"
    return text


class StopOnCtrlC:
    """Ctrl-C during ``softprompt train``: the first asks the loop to stop before its next optimizer step, a second
    stops at once.

    A KeyboardInterrupt raised the moment the signal arrives can land inside a finalizer (a ``__del__`` that the
    garbage collector runs), where Python swallows it and the run goes on to the end; a request the loop reads
    between steps is never lost.
    """

    def __init__(self) -> None:
        self.requested = False

    def pending(self) -> bool:
        """Whether Ctrl-C was pressed."""
        return self.requested

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nsoftprompt train: stopping before the next optimizer step (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnCtrlC":
        self.previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exception: Any) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run_train(args: argparse.Namespace) -> int:
    """Trains with the config the flags (and ``--config``) describe, printing progress; returns the exit status."""
    from tqdm.auto import tqdm

    from softprompt.training import TrainingDivergedError, train

    config = train_config_from_args(args)
    _quiet_libraries()

    def on_event(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            tqdm.write(
                f"softprompt train: {event['method']} on {event['base_model']} ({event['device']}, "
                f"{event['processes']} process(es){', base sharded (FSDP2)' if event.get('fsdp') else ''}); "
                f"{event['recipe']} recipe, {event['train_examples']} training / "
                f"{event['eval_examples']} held-out examples, {event['steps']} optimizer steps; adapters "
                f"{event['adapters']}; trainable params: {event['trainable_parameters']:,d} || all params: "
                f"{event['total_parameters']:,d}; virtual-token layout {event['virtual_token_layout']}"
            )
        elif kind == "resumed":
            tqdm.write(f"resumed from {event['checkpoint']} (step {event['step']}, epoch {event['epoch']})")
        elif kind == "resume_without_checkpoint":
            tqdm.write(f"--resume: {event['output_dir']} has no checkpoint yet; starting from scratch")
        elif kind == "checkpoint_skipped":
            tqdm.write(f"skipped damaged checkpoint {event['path']}: {event['reason']}")
        elif kind == "leftovers_removed":
            tqdm.write(f"removed what an interrupted run left behind: {', '.join(event['paths'])}")
        elif kind == "metrics_incomplete":
            tqdm.write(f"warning: {event['path']} holds {event['found']} bytes where the checkpoint recorded "
                       f"{event['recorded']}: records up to step {event['step']} are lost; logging continues from "
                       "there")
        elif kind == "eval":
            tqdm.write(f"eval after epoch {event['epoch']} (step {event['step']}): {_format_eval(event)}")
        elif kind == "checkpoint":
            tqdm.write(f"checkpoint: {event['path']}")

    try:
        with StopOnCtrlC() as stop_request:
            result = train(config, on_event=on_event, stop_requested=stop_request.pending)
    except TrainingDivergedError as error:
        print(f"softprompt train: stopped: {error}", file=sys.stderr)
        return 1
    if not _is_main_process():
        return 0
    print(f"\nfinished {result.global_step} steps in {result.elapsed_seconds:.1f} s")
    for name, directory in result.adapter_directories.items():
        print(f"adapter {name}: {directory}")
    print(f"metrics: {result.metrics_path}")
    print(f"plot: {result.plot_path}")
    print(f"base model: {result.base_model}")
    if result.initial_eval is not None:
        print(f"eval before training: {_format_eval(result.initial_eval)}")
    if result.final_eval is not None:
        print(f"eval after training:  {_format_eval(result.final_eval)}")
    if result.generations:
        print("generations on held-out examples (greedy):")
        for sample in result.generations:
            print(f"  [{sample['adapter']}] {sample['prompt']!r} -> {sample['output']!r} "
                  f"(reference: {sample['reference']!r})")
    first = next(iter(result.adapter_directories.values()))
    print(f"try: softprompt generate --adapter {first} --prompt {_example_prompt(result)!r}")
    return 0


def _example_prompt(result: Any) -> str:
    if result.generations:
        return result.generations[0]["prompt"]
    return "Tweet text : my order never arrived Label : "


def _parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """``DIR`` or ``name=DIR`` -> {name: DIR}; a bare DIR is named after its folder (``adapter``, ``quotes``)."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, separator, directory = spec.partition("=")
        if not separator or "/" in name or os.sep in name or not name:
            name, directory = Path(spec).resolve().name, spec
        if name in adapters:
            raise ValueError(
                f"--adapter {spec!r}: the name {name!r} is already used by {adapters[name]}. "
                "Fix: name them, e.g. --adapter quotes=DIR1 --adapter prompts=DIR2."
            )
        adapters[name] = Path(directory)
    return adapters


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``softprompt eval``: loss, perplexity and accuracy of saved adapters."""
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and accuracy of saved adapters on a dataset",
        description="Evaluate saved adapters. Without data flags, on the held-out rows of the training run that "
        "wrote the adapter (its train_config.json), which reproduces the run's last evaluation; with --dataset or "
        "--split, on every row of that split.",
    )
    parser.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                        help="adapter directory; repeat with NAME=DIR for several (rows use their task's adapter)")
    parser.add_argument("--model", help="base model (hub id, directory or .gguf file); omitted: the one the adapter "
                        "records (a .gguf file must still have the SHA-256 its run recorded)")
    parser.add_argument("--config", type=Path, help="YAML or JSON settings file for the data fields")
    parser.add_argument("--dataset", action="append", help="hub dataset or local file (repeatable)")
    parser.add_argument("--dataset-config", dest="dataset_config")
    parser.add_argument("--split", help="evaluate every row of this split")
    parser.add_argument("--text-column", dest="text_column", action="append")
    parser.add_argument("--label-column", dest="label_column")
    parser.add_argument("--task-column", dest="task_column")
    parser.add_argument("--max-length", dest="max_length", type=int)
    parser.add_argument("--eval-batch-size", dest="eval_batch_size", type=int)
    parser.add_argument("--device", choices=typing.get_args(Device))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluates the adapters on the training run's held-out rows or on the given data; returns the exit status."""
    from softprompt.training import evaluate_adapters, run_config_for_adapter

    _quiet_libraries()
    adapters = _parse_adapter_specs(args.adapter)
    run_config = run_config_for_adapter(next(iter(adapters.values())))
    values = run_config.flat() if run_config is not None else {}
    if args.config is not None:
        values.update(flatten_settings(read_config_file(args.config)))
    overrides = {name: getattr(args, name) for name in ("dataset", "dataset_config", "text_column", "label_column",
                                                          "task_column", "max_length", "eval_batch_size", "device")
                 if getattr(args, name) is not None}
    if "dataset" in overrides:  # new data: its own columns, not the training run's
        for name in ("text_column", "label_column", "task_column", "dataset_config"):
            values.pop(name, None)
    values.update(overrides)
    values.update(resume=False, overwrite=False)
    config = TrainConfig.from_dict(values, "eval settings")
    split = args.split if args.split is not None else ("train" if args.dataset else None)
    result = evaluate_adapters(adapters, config, model_name=args.model, split=split)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = f"{result['examples']} rows" + (f" of split {split!r}" if split else " held out by the training run")
    print(f"{', '.join(f'{n}={p}' for n, p in result['adapters'].items())} on {result['base_model']}, {rows}:")
    print(f"  {_format_eval(result)}")
    if len(result["loss_by_adapter"]) > 1:
        for name, loss in result["loss_by_adapter"].items():
            print(f"  {name}: loss {loss:.4f}")
    return 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``softprompt generate``: text from saved adapters on one frozen base."""
    parser = subparsers.add_parser(
        "generate",
        help="generate text with saved adapters",
        description="Generate with one or several saved adapters on one frozen base. With several --adapter "
        "NAME=DIR, --use NAME picks one; without --use, every adapter answers every prompt.",
    )
    parser.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                        help="adapter directory; repeat with NAME=DIR for several")
    parser.add_argument("--use", action="append", metavar="NAME", help="the adapter(s) to generate with")
    parser.add_argument("--task", help="the task of every prompt, for a multitask prompt tuning adapter: a task name "
                        "it records (its run's task column or datasets) or a task id")
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    parser.add_argument("--model", help="base model (hub id, directory or .gguf file); omitted: the one the adapter "
                        "records (a .gguf file must still have the SHA-256 its run recorded)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", choices=typing.get_args(Device), default="auto")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Prints each chosen adapter's continuation of each prompt; returns the exit status."""
    import torch

    from softprompt.inputs import check_generate_options
    from softprompt.training import generate_texts, load_adapters
    from softprompt.training.base_model import cpu_threads, default_threads

    _quiet_libraries()
    adapters = _parse_adapter_specs(args.adapter)
    chosen = args.use or list(adapters)
    unknown = [name for name in chosen if name not in adapters]
    if unknown:
        raise ValueError(f"--use {unknown}: not among the adapters {list(adapters)}. Fix: pick one of those names.")
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "num_beams"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    check_generate_options(options)  # before the model loads: a typo costs nothing
    model, tokenizer, _ = load_adapters(adapters, args.model, args.device)
    with cpu_threads(default_threads(model.base_model)):
        for name in chosen:
            torch.manual_seed(args.seed)
            task_id = generation_task_id(model.adapter_configs[name], args.task)
            for prompt, output in zip(args.prompt, generate_texts(model, tokenizer, args.prompt, name, task_id,
                                                                  **options)):
                print(f"[{name}] {prompt}{output}")
    return 0


def generation_task_id(config: Any, task: str | None) -> int | None:
    """The task id ``--task`` names for an adapter (None for an adapter without tasks).

    Raises:
        ValueError: a multitask adapter of several tasks without ``--task``, or a task it does not know.
    """
    if not method_of(config).takes_task_ids:
        return None
    if task is None:
        if config.num_tasks > 1:
            known = config.task_names or list(range(config.num_tasks))
            raise ValueError(
                f"The multitask adapter has {config.num_tasks} tasks ({known}): expected --task to say which one the "
                "prompts are. Fix: pass --task with one of those."
            )
        return 0
    return task_ids_of(config, [task])[0]


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train_parser,
    add_eval_parser,
    add_generate_parser,
    add_params_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``softprompt`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command-line entry point.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0; 2 after printing the message of a `ValueError` (bad input, with its fix); 1 after an
        operating-system error (permissions, a full disk, ...), said in words with the fix; 130 after Ctrl-C, with
        what a training run's message says about resuming it.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"softprompt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:  # a training run's says where it stopped; any other, that it did
        print(f"\nsoftprompt {args.command}: {str(interruption) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"softprompt {args.command}: error: {describe_os_error(error, args.command)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if "symlink loop" not in str(error).lower():  # pathlib's resolve() reports a loop as a RuntimeError
            raise
        print(f"softprompt {args.command}: error: {error}: the path leads in a circle of symbolic links. Fix: "
              "point to the real file or folder.", file=sys.stderr)
        return 1


def describe_os_error(error: OSError, command: str) -> str:
    """What an operating-system error means for the command, with the fix: no traceback for them."""
    where = f"{error.filename}: " if error.filename else ""
    if error.errno == errno.ENOSPC:
        resume = (" Nothing already written is lost: every file is written whole or not at all, and the newest "
                  "checkpoint is complete. Fix: free space, then run the same command with --resume."
                  if command == "train" else " Fix: free space, then run the command again.")
        return f"{where}no space left on the device.{resume}"
    if isinstance(error, PermissionError):
        return f"{where}permission denied. Fix: choose a folder you may write to (or read, for inputs)."
    if isinstance(error, IsADirectoryError):
        return f"{where}a folder where a file is expected. Fix: pass the file, or another path."
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        return f"{where}a file where a folder is expected (or in its path). Fix: pass a folder, or another path."
    if error.errno == errno.ELOOP:
        return f"{where}the path leads in a circle of symbolic links. Fix: point to the real file or folder."
    return f"{where}{error.strerror or error}. Fix: check the path and the disk."


if __name__ == "__main__":
    sys.exit(main())
