"""The ``softprompt`` command: a thin layer over the library (it parses flags, calls, and prints).

Subcommands: ``train`` (train a soft prompt; with no flags, the embedded offline default), ``eval`` (loss,
perplexity and accuracy of saved adapters), ``generate`` (text from saved adapters), ``params`` (parameter counts on
the meta device). Run ``softprompt SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softprompt.methods import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from softprompt.params import SEED_CONFIGS, base_model_config, parameter_counts
from softprompt.train_config import (
    BASE_DTYPE_CHOICES,
    COMPILE_CHOICES,
    DEFAULT_NUM_VIRTUAL_TOKENS,
    DEVICE_CHOICES,
    LOSS_IMPLEMENTATION_CHOICES,
    METHODS,
    MIXED_PRECISION_CHOICES,
    PADDING_CHOICES,
    VIRTUAL_TOKEN_LAYOUT_CHOICES,
    TrainConfig,
    read_config_file,
)


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
        help="built-in BLOOM name (works offline), local model directory, or hub id (default: %(default)s)",
    )
    parser.add_argument("--method", choices=["prompt-tuning", "p-tuning", "prefix-tuning"], help="count one config")
    parser.add_argument("--num-virtual-tokens", type=int, default=None,
                        help="default: the seed guides' count for --method (8 for prompt tuning, 20 otherwise)")
    parser.add_argument("--encoder-hidden-size", type=int, default=None)
    parser.add_argument("--encoder-reparameterization-type", choices=["MLP", "LSTM"], default="MLP")
    parser.add_argument("--prefix-projection", action="store_true")
    parser.set_defaults(run=run_params)


def run_params(args: argparse.Namespace) -> int:
    """Prints one count line per configuration; returns the exit status."""
    if args.method is None:
        configs = dict(SEED_CONFIGS)
    else:
        num_virtual_tokens = args.num_virtual_tokens
        if num_virtual_tokens is None:
            num_virtual_tokens = DEFAULT_NUM_VIRTUAL_TOKENS[args.method]
        config = {
            "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=num_virtual_tokens),
            "p-tuning": lambda: PromptEncoderConfig(
                num_virtual_tokens=num_virtual_tokens,
                encoder_hidden_size=args.encoder_hidden_size,
                encoder_reparameterization_type=args.encoder_reparameterization_type,
            ),
            "prefix-tuning": lambda: PrefixTuningConfig(
                num_virtual_tokens=num_virtual_tokens,
                encoder_hidden_size=args.encoder_hidden_size,
                prefix_projection=args.prefix_projection,
            ),
        }[args.method]()
        configs = {args.method: config}
    rows = parameter_counts(base_model_config(args.model), configs)
    print(f"{args.model} (counted on the meta device)")
    width = max(len(row.label) for row in rows)
    for row in rows:
        print(
            f"{row.label:<{width}}  trainable params: {row.trainable:,d} || all params: {row.total:,d} "
            f"|| trainable%: {row.trainable_percent:.4f}"
        )
    return 0


def _default(name: str) -> Any:
    """TrainConfig's default for a field, for the help text."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _flag(group: argparse._ArgumentGroup, name: str, help: str, **kwargs: Any) -> None:
    """Adds ``--field-name`` for a TrainConfig field. Flags default to "not given" (SUPPRESS), so that only the
    flags actually typed override the config file."""
    default = _default(name)
    shown = "" if default in (None, [], "") else f" (default: {default})"
    group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                       help=help + shown, **kwargs)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``softprompt train``: one flag per `TrainConfig` field, grouped as in the config."""
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
        "several processes: torchrun --nproc_per_node 2 -m softprompt.cli train ...",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON file of settings (field names); "
                        "flags override it")
    model = parser.add_argument_group("model and method")
    _flag(model, "model", "hub id or local directory; omitted: the embedded tiny BLOOM")
    _flag(model, "method", "soft-prompt method", choices=METHODS)
    _flag(model, "num_virtual_tokens", "virtual tokens; omitted: 8 for prompt tuning, 20 otherwise", type=int)
    _flag(model, "prompt_tuning_init", "prompt-tuning init; omitted: TEXT on the default data or with "
          "--prompt-tuning-init-text, else RANDOM", type=str.upper, choices=["RANDOM", "TEXT", "SAMPLE_VOCAB"])
    _flag(model, "prompt_tuning_init_text", "text for TEXT init")
    _flag(model, "encoder_reparameterization_type", "p-tuning encoder", type=str.upper, choices=["MLP", "LSTM"])
    _flag(model, "encoder_hidden_size", "p-tuning / prefix-projection width; omitted: the base's hidden size",
          type=int)
    _flag(model, "encoder_num_layers", "p-tuning LSTM layers", type=int)
    _flag(model, "encoder_dropout", "p-tuning LSTM dropout", type=float)
    _flag(model, "prefix_projection", "prefix tuning through an MLP", action=argparse.BooleanOptionalAction)
    _flag(model, "base_dtype", "dtype of the frozen base", choices=BASE_DTYPE_CHOICES)
    data = parser.add_argument_group("data")
    _flag(data, "dataset", "hub dataset or local .csv/.json/.jsonl/.parquet; repeat for one adapter per dataset; "
          "omitted: the shipped complaints.csv", action="append")
    _flag(data, "dataset_config", "hub dataset configuration, e.g. twitter_complaints")
    _flag(data, "split", "training split (slicing works: 'train[:50]')")
    _flag(data, "eval_split", "evaluation split; omitted: hold out --eval-fraction of the training rows")
    _flag(data, "eval_fraction", "held-out fraction (0: no evaluation)", type=float)
    _flag(data, "text_column", "text column (repeat once per --dataset to differ); omitted on the default data: "
          "'Tweet text'", action="append")
    _flag(data, "label_column", "label column: classification as generation; omitted: causal LM on the text "
          "(on the default data: text_label)")
    _flag(data, "task_column", "column naming each row's task: one adapter per task")
    _flag(data, "max_length", "most tokens per example", type=int)
    _flag(data, "padding", "batch padding", choices=PADDING_CHOICES)
    optimization = parser.add_argument_group("optimization")
    _flag(optimization, "learning_rate", "peak AdamW learning rate", type=float)
    _flag(optimization, "weight_decay", "AdamW weight decay", type=float)
    _flag(optimization, "num_epochs", "epochs", type=int)
    _flag(optimization, "batch_size", "rows per micro-batch per process", type=int)
    _flag(optimization, "eval_batch_size", "rows per evaluation batch", type=int)
    _flag(optimization, "gradient_accumulation_steps", "micro-batches per optimizer step", type=int)
    _flag(optimization, "warmup_steps", "linear warmup steps (then linear decay to 0)", type=int)
    _flag(optimization, "max_grad_norm", "clip each adapter's gradient norm (0: off)", type=float)
    _flag(optimization, "mixed_precision", "CUDA autocast", choices=MIXED_PRECISION_CHOICES)
    _flag(optimization, "loss_implementation", "compute_loss implementation", choices=LOSS_IMPLEMENTATION_CHOICES)
    _flag(optimization, "virtual_token_layout", "virtual tokens as a once-computed prefix or in every row",
          choices=VIRTUAL_TOKEN_LAYOUT_CHOICES)
    _flag(optimization, "compile", "torch.compile mode for the frozen decoder (omitted: eager)",
          choices=COMPILE_CHOICES)
    _flag(optimization, "device", "where to train", choices=DEVICE_CHOICES)
    _flag(optimization, "num_threads", "torch CPU threads; omitted: 1 for tiny models, torch's default otherwise",
          type=int)
    _flag(optimization, "seed", "seed of init, held-out split and data order", type=int)
    output = parser.add_argument_group("output and checkpoints")
    _flag(output, "output_dir", "run directory; omitted: softprompt-runs/<method>")
    _flag(output, "save_every", "checkpoint every N optimizer steps (0: epoch ends only)", type=int)
    _flag(output, "keep_last", "complete checkpoints kept", type=int)
    _flag(output, "resume", "continue from the newest complete checkpoint", action=argparse.BooleanOptionalAction)
    _flag(output, "overwrite", "delete the previous run's checkpoints and start over",
          action=argparse.BooleanOptionalAction)
    _flag(output, "num_generations", "held-out examples generated and printed at the end", type=int)
    _flag(output, "progress", "progress bars", action=argparse.BooleanOptionalAction)
    parser.set_defaults(run=run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags."""
    flags = {name: value for name, value in vars(args).items() if name in TrainConfig.field_names()}
    values = read_config_file(args.config) if args.config is not None else {}
    values.update(flags)
    return TrainConfig(**values)


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
    return text


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
                f"{event['processes']} process(es)); {event['recipe']} recipe, {event['train_examples']} training / "
                f"{event['eval_examples']} held-out examples, {event['steps']} optimizer steps; adapters "
                f"{event['adapters']}; trainable params: {event['trainable_parameters']:,d} || all params: "
                f"{event['total_parameters']:,d}"
            )
        elif kind == "resumed":
            tqdm.write(f"resumed from {event['checkpoint']} (step {event['step']}, epoch {event['epoch']})")
        elif kind == "resume_without_checkpoint":
            tqdm.write(f"--resume: no complete checkpoint in {event['output_dir']}; starting from scratch")
        elif kind == "checkpoint_skipped":
            tqdm.write(f"skipped damaged checkpoint {event['path']}: {event['reason']}")
        elif kind == "eval":
            tqdm.write(f"eval after epoch {event['epoch']} (step {event['step']}): {_format_eval(event)}")
        elif kind == "checkpoint":
            tqdm.write(f"checkpoint: {event['path']}")

    try:
        result = train(config, on_event=on_event)
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
    if result.initial_eval is not None and result.final_eval is not None:
        print(f"eval before training: {_format_eval(result.initial_eval)}")
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
    parser.add_argument("--model", help="base model; omitted: the one the adapter records")
    parser.add_argument("--config", type=Path, help="YAML or JSON settings file for the data fields")
    parser.add_argument("--dataset", action="append", help="hub dataset or local file (repeatable)")
    parser.add_argument("--dataset-config", dest="dataset_config")
    parser.add_argument("--split", help="evaluate every row of this split")
    parser.add_argument("--text-column", dest="text_column", action="append")
    parser.add_argument("--label-column", dest="label_column")
    parser.add_argument("--task-column", dest="task_column")
    parser.add_argument("--max-length", dest="max_length", type=int)
    parser.add_argument("--eval-batch-size", dest="eval_batch_size", type=int)
    parser.add_argument("--device", choices=DEVICE_CHOICES)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluates the adapters on the training run's held-out rows or on the given data; returns the exit status."""
    from softprompt.training import evaluate_adapters, run_config_for_adapter

    _quiet_libraries()
    adapters = _parse_adapter_specs(args.adapter)
    run_config = run_config_for_adapter(next(iter(adapters.values())))
    values = run_config.to_dict() if run_config is not None else {}
    if args.config is not None:
        values.update(read_config_file(args.config))
    overrides = {name: getattr(args, name) for name in ("dataset", "dataset_config", "text_column", "label_column",
                                                          "task_column", "max_length", "eval_batch_size", "device")
                 if getattr(args, name) is not None}
    if "dataset" in overrides:  # new data: its own columns, not the training run's
        for name in ("text_column", "label_column", "task_column", "dataset_config"):
            values.pop(name, None)
    values.update(overrides)
    values.update(resume=False, overwrite=False)
    config = TrainConfig(**values)
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
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    parser.add_argument("--model", help="base model; omitted: the one the adapter records")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Prints each chosen adapter's continuation of each prompt; returns the exit status."""
    import torch

    from softprompt.training import cpu_threads, default_threads, generate_texts, load_adapters

    _quiet_libraries()
    adapters = _parse_adapter_specs(args.adapter)
    chosen = args.use or list(adapters)
    unknown = [name for name in chosen if name not in adapters]
    if unknown:
        raise ValueError(f"--use {unknown}: not among the adapters {list(adapters)}. Fix: pick one of those names.")
    model, tokenizer, _ = load_adapters(adapters, args.model, args.device)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "num_beams"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    with cpu_threads(default_threads(model.base_model)):
        for name in chosen:
            torch.manual_seed(args.seed)
            for prompt, output in zip(args.prompt, generate_texts(model, tokenizer, args.prompt, name, **options)):
                print(f"[{name}] {prompt}{output}")
    return 0


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
        The exit status: 0, or 2 after printing the message of a `ValueError` (bad input, with its fix).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"softprompt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
