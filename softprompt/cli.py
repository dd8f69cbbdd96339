"""The ``softprompt`` command: a thin layer over the library (it parses flags, calls, and prints).

Subcommands: ``params`` (parameter counts on the meta device). Run ``softprompt SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from softprompt.bloom_family import SEED_CONFIGS, base_model_config, parameter_counts
from softprompt.p_tuning import PromptEncoderConfig
from softprompt.prefix_tuning import PrefixTuningConfig
from softprompt.prompt_tuning import PromptTuningConfig


def add_params_parser(subparsers: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--encoder-hidden-size", type=int, default=None)
    parser.add_argument("--encoder-reparameterization-type", choices=["MLP", "LSTM"], default="MLP")
    parser.add_argument("--prefix-projection", action="store_true")
    parser.set_defaults(run=run_params)


def run_params(args: argparse.Namespace) -> int:
    if args.method is None:
        configs = dict(SEED_CONFIGS)
    else:
        config = {
            "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens),
            "p-tuning": lambda: PromptEncoderConfig(
                num_virtual_tokens=args.num_virtual_tokens,
                encoder_hidden_size=args.encoder_hidden_size,
                encoder_reparameterization_type=args.encoder_reparameterization_type,
            ),
            "prefix-tuning": lambda: PrefixTuningConfig(
                num_virtual_tokens=args.num_virtual_tokens,
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


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_params_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"softprompt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
