"""Quality on a real model: the seed guide's classification recipe, trained by softprompt and by PEFT, on
SmolLM2-135M-Instruct (scripts/real_model.py) and the shipped SMS Spam Collection sample (softprompt/data/sms_spam.csv,
200 ham / 200 spam, CC BY 4.0), beside the base model answering zero-shot from a written instruction.

For every method registered in ``softprompt.methods.METHODS`` (methods added later join by themselves, with their
`softprompt train` defaults; PEFT's side runs where PEFT has the method):

1. softprompt: ``softprompt.training.train``, the loop ``softprompt train`` runs, with the recipe's settings: the
   classification recipe (``"text : {text} Label : "`` then the label and EOS), AdamW at the learning rate, linear
   decay, batches of 8, no clipping (the guide clips nothing), evaluation after every epoch.
2. PEFT: the guide's own loop in plain PyTorch (``model(**batch).loss.backward()``, ``optimizer.step()``,
   ``lr_scheduler.step()``, ``optimizer.zero_grad()``) on a ``PeftModel`` (``peft_reference.peft_twin``) that starts
   from the same initial adapter (same seed), over the same rows in the same order and batches, with the same
   optimizer, schedule and epochs. Its batches are right-padded: on left-padded rows PEFT's training forward shifts
   a rotary model's positions by the padding (README, "Where PEFT differs"), which would handicap it.
3. Both trained adapters are scored by the same code (``softprompt.training.evaluate``) on the same held-out rows:
   eval loss (mean over label + EOS tokens), generated-label accuracy (greedy), rank-classification accuracy (the
   label scored highest among the dataset's labels, ``softprompt/training/rank_classification.py``).
4. Zero-shot: the base model reading a written instruction before each prompt (a prompt-tuning adapter whose
   virtual tokens are the instruction's own token embeddings, which is exactly the base model reading the
   instruction: tests/test_real_model_exact.py), scored the same way.

Both sides' training loss at every step is kept in the JSON; ``steps_alike`` counts the steps, from the first, where
the two agree to 1e-3 relative. The first step's losses differ by float32 rounding alone (~1e-6); AdamW's first
updates move every parameter by about the learning rate whatever its gradient's size (above eps), so rounding that
flips a near-zero gradient's sign changes its update by up to twice the learning rate, and the two runs part within
a few steps. That they compute the same steps is shown in float64 (tests/test_real_model_exact.py), not here.

Wall time: each side's training steps (batch collation, forward, backward, optimizer step), summed, and the median
step; softprompt's whole run (its evaluations after every epoch and its checkpoints included) beside it. Both run on
the same machine one after the other, on torch's default threads; the load average before and after each is
recorded (other processes' work only adds time). Held-out accuracy on 100 rows moves in steps of 0.01; its binomial
standard error near 0.9 is 0.03.

Run from the repository root:

    python benchmarks/quality.py                # every method, 2 epochs (about 2 hours on 2 CPU cores)

The committed results come from parts run side by side, one torch thread each (within a part, each method's
softprompt run and PEFT run follow each other on the same core and load):

    python benchmarks/quality.py --threads 1 --methods prompt-tuning p-tuning prefix-tuning adaption-prompt
        # stopped at adaption prompt's PEFT side before writing: records kept in quality_cpu_part1.log
    python benchmarks/quality.py --threads 1 --methods adaption-prompt --name quality_cpu_adaption
    python benchmarks/quality.py --threads 1 --methods multitask-prompt-tuning --name quality_cpu_multitask
    python benchmarks/quality.py --threads 1 --methods cpt cartridge --name quality_cpu_more
        # stopped after CPT, before writing: records kept in quality_cpu_more.log
    python benchmarks/quality.py --threads 1 --methods cartridge --name quality_cpu_cartridge
    python benchmarks/quality.py --threads 1 --methods prefix-tuning --name quality_cpu_prefix
        # prefix tuning again, with the per-step losses (steps_alike) that the first part did not record yet

Results: ``benchmarks/results/<name>.{json,md}`` and ``<name>_curves_<method>.png`` (softprompt's run: loss and
both accuracies per epoch).

Shapes: B batch, T tokens.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

import harness
import softprompt
from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.data import collate
from softprompt.methods import METHODS
from softprompt.training import TrainConfig, evaluate, load_base_model, read_metrics, train
from softprompt.training.examples import DEFAULT_ADAPTER_NAME, epoch_order, prepare_data
from softprompt.training.method_data import prepare_run_data
from softprompt.training.prepared import batch_task_ids

from peft_reference import copy_weights_from_peft, peft_config_for, peft_twin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from real_model import TRANSFORMERS_FOLDER, real_model_directory  # noqa: E402

DATA = Path(softprompt.__file__).parent / "data" / "sms_spam.csv"
PROMPT_TUNING_TEXT = "Classify if the text message is spam or not:"
"""The seed guide's TEXT init ("Classify if the tweet is a complaint or not:") for this data."""
INSTRUCTION = ("Decide whether the text message below is spam or ham (an ordinary message). Answer with one word: "
               "ham or spam.\n")
"""What the zero-shot base model reads before each prompt."""
RECIPES: dict[str, dict[str, Any]] = {
    "prompt-tuning": {"num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",
                      "prompt_tuning_init_text": PROMPT_TUNING_TEXT},
    "p-tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 128},
    "prefix-tuning": {"num_virtual_tokens": 20},
}
"""The seed guide's adapter settings per method; a method not listed gets `softprompt train`'s defaults."""


def settings_for(method: str, args: argparse.Namespace, data: Path, output_dir: Path) -> TrainConfig:
    """The recipe's settings for one method, as `softprompt train` flags would give them."""
    # --cli-defaults: what `softprompt train --method METHOD` picks by itself (adapter fields, gradient clipping).
    recipe = {} if args.cli_defaults else {**RECIPES.get(method, {}), "max_grad_norm": 0.0}
    return TrainConfig.from_dict({
        "model": str(args.model), "method": method, **recipe,
        "dataset": [str(data)], "text_column": ["text"], "label_column": "label",
        "eval_fraction": args.eval_rows / args.rows, "max_length": args.max_length,
        "learning_rate": args.learning_rate, "num_epochs": args.epochs, "batch_size": args.batch_size,
        "seed": args.seed, "output_dir": str(output_dir), "num_generations": 0,
        "progress": False, "save_every": 0, "num_threads": args.threads, **dict(args.set),
    }, "quality benchmark settings")


def softprompt_run(config: TrainConfig) -> dict[str, Any]:
    """Trains with softprompt's loop; returns the final evaluation, timings and the per-epoch records."""
    load_before = harness.load_average()
    result = train(config)
    records = read_metrics(result.metrics_path)
    steps = [record["seconds"] for record in records if record["event"] == "train"]
    return {**scores(result.final_eval), "initial_loss": result.initial_eval["loss"],
            "train_seconds": sum(steps), "median_step_seconds": statistics.median(steps), "steps": len(steps),
            "step_losses": [record["loss"] for record in records if record["event"] == "train"],
            "run_seconds": result.elapsed_seconds, "load_before": load_before, "load_after": harness.load_average(),
            "epochs": [scores(record) | {"epoch": record["epoch"]} for record in records if record["event"] == "eval"],
            "plot": result.plot_path}


def peft_run(config: TrainConfig) -> dict[str, Any]:
    """The guide's loop on PEFT from softprompt's initial adapter; the result scored by `evaluate`."""
    optimization = config.optimization
    # As softprompt's loop does: seed, load the base, build the adapter: the same initial weights (checked by the
    # eval loss before training, recorded as initial_loss beside softprompt's). A fresh base: PEFT holds it.
    torch.manual_seed(optimization.seed)
    base, tokenizer = load_base_model(config.model)
    # The run's own data and adapter config, as softprompt's loop prepares them: multitask rows carry task ids, and
    # CPT's context is made of training rows, which then leave the training set.
    data, adapters = prepare_run_data(config, tokenizer)
    ours = SoftPromptModel(base, adapters[DEFAULT_ADAPTER_NAME], tokenizer=tokenizer)
    loss_rows = dataclasses.replace(data, eval_prompts=[])  # the loss alone: what shows the same start
    initial = evaluate(ours, tokenizer, loss_rows, optimization.eval_batch_size, config.data.padding,
                       config.data.max_length)["loss"]
    run_config = dataclasses.replace(config, adapter=adapters[DEFAULT_ADAPTER_NAME])  # CPT's context included
    theirs = peft_twin(ours, base, peft_config=peft_config(run_config), share_base=True).train()
    trainable = [parameter for parameter in theirs.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optimization.learning_rate, weight_decay=optimization.weight_decay)
    steps_per_epoch = -(-len(data.train) // optimization.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * optimization.num_epochs)
    load_before = harness.load_average()
    steps, step_losses = [], []
    for epoch in range(optimization.num_epochs):
        order = epoch_order(len(data.train), optimization.seed, epoch)  # softprompt's order: the same batches
        for start in range(0, len(order), optimization.batch_size):
            started = time.perf_counter()
            rows = [data.train[index] for index in order[start : start + optimization.batch_size]]
            batch = collate(rows, pad_token_id=tokenizer.pad_token_id, padding_side="right")
            task_ids = batch_task_ids(batch)  # PEFT's multitask prompt tuning takes them as `task_ids` too
            extra = {} if task_ids is None else {"task_ids": task_ids}
            loss = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], **extra).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            steps.append(time.perf_counter() - started)
            step_losses.append(loss.item())  # outside the timed step
    load_after = harness.load_average()
    theirs.eval()
    # Scored on a fresh base: PEFT's adaption prompt has replaced `base`'s attention modules with its own in place.
    fresh_base, _ = load_base_model(config.model)
    scored = SoftPromptModel(fresh_base, adapters[DEFAULT_ADAPTER_NAME], tokenizer=tokenizer)
    copy_weights_from_peft(theirs, scored)
    final = evaluate(scored, tokenizer, data, optimization.eval_batch_size, config.data.padding,
                     config.data.max_length)
    return {**scores(final), "initial_loss": initial, "train_seconds": sum(steps),
            "median_step_seconds": statistics.median(steps), "steps": len(steps), "step_losses": step_losses,
            "load_before": load_before, "load_after": load_after}


def zero_shot(config: TrainConfig, base: torch.nn.Module, tokenizer: Any, data: Any) -> dict[str, Any]:
    """The base model reading `INSTRUCTION` before each prompt, scored by `evaluate`."""
    length = len(tokenizer(INSTRUCTION)["input_ids"])
    instruction = PromptTuningConfig(num_virtual_tokens=length, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=INSTRUCTION)  # exactly its ids: nothing cut or repeated
    model = SoftPromptModel(base, instruction, tokenizer=tokenizer)
    started = time.perf_counter()
    result = evaluate(model, tokenizer, data, config.optimization.eval_batch_size, config.data.padding,
                      config.data.max_length)
    return {**scores(result), "run_seconds": time.perf_counter() - started}


def peft_config(config: TrainConfig) -> Any:
    """PEFT's configuration of the method, or None where PEFT has no such method."""
    # PEFT's TEXT init reads the tokenizer itself (its initial table is then replaced by softprompt's, equal).
    extra = {"tokenizer_name_or_path": config.model} if hasattr(config.adapter, "prompt_tuning_init_text") else {}
    try:
        return peft_config_for(config.adapter, **extra)
    except AttributeError:  # no PEFT class of that name
        return None


def steps_alike(ours: list[float], theirs: list[float], relative: float = 1e-3) -> int:
    """How many training steps, from the first, both sides' losses agree to `relative`: float32 rounding alone
    stays near 1e-6 at first, so the count shows how long the two runs follow one trajectory before they part."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if abs(a - b) > relative * max(abs(a), abs(b)):
            return step
    return min(len(ours), len(theirs))


def scores(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record[key] for key in ("loss", "accuracy", "rank_accuracy")}


def sampled_data(rows: int, seed: int, folder: Path) -> Path:
    """`rows` rows of the shipped data, half ham and half spam, drawn with `seed`, as a CSV in `folder`."""
    with DATA.open(newline="", encoding="utf-8") as file:
        shipped = list(csv.DictReader(file))
    if rows >= len(shipped):
        return DATA
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in ("ham", "spam"):
        of_label = [row for row in shipped if row["label"] == label]
        order = torch.randperm(len(of_label), generator=generator).tolist()
        chosen += [of_label[index] for index in sorted(order[: rows // 2])]
    path = folder / "sms_spam_sample.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(chosen)
    return path


def setting(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` as a (field, value) pair, the value read as JSON where it is JSON (``0.1``, ``true``)."""
    field, _, value = text.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a transformers directory (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", nargs="*", default=[spec.cli_name for spec in METHODS.values()])
    parser.add_argument("--rows", type=int, default=400, help="rows of the shipped data (half of each label)")
    parser.add_argument("--eval-rows", type=int, default=100, help="of which held out")
    parser.add_argument("--epochs", type=int, default=2, help="2 learn every method here (see the results)")
    parser.add_argument("--learning-rate", type=float, default=3e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96, help="the longest SMS prompt + label + EOS is 90")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="FIELD=VALUE",
                        help="another value for a training setting (any `softprompt train` field; JSON values)")
    parser.add_argument("--no-peft", action="store_true", help="softprompt's runs only (choosing settings)")
    parser.add_argument("--cli-defaults", action="store_true",
                        help="each method as `softprompt train` configures it by itself, instead of the guide's recipe")
    parser.add_argument("--name", default="quality_cpu")
    args = parser.parse_args()
    if args.model is None:
        args.model = real_model_directory(prepare=True) / TRANSFORMERS_FOLDER
    torch.set_num_threads(args.threads)  # PEFT's side and the zero-shot evaluation; softprompt's loop sets its own
    machine = harness.machine_info("cpu")  # after: it records the threads the runs use
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    columns = ["method", "library", "loss", "accuracy", "rank_accuracy", "initial_loss", "train_seconds",
               "median_step_seconds", "steps", "steps_alike", "run_seconds"]
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])

    def write() -> None:  # after every method: a run that fails later keeps what it measured
        harness.write_results(args.name, rows, machine, harness.markdown_table(rows, columns),
                              extra={"arguments": {k: str(v) for k, v in vars(args).items()}, "details": details},
                              command=command.strip())
    with tempfile.TemporaryDirectory(prefix="softprompt-quality-") as scratch:
        data_path = sampled_data(args.rows, args.seed, Path(scratch))
        reference = settings_for(args.methods[0], args, data_path, Path(scratch) / "unused")
        base, tokenizer = load_base_model(str(args.model))
        data = prepare_data(reference, tokenizer)
        print(f"{len(data.train)} training rows, {len(data.eval)} held out; labels "
              f"{[text for text, _ in data.label_choices['default']]}", flush=True)
        baseline = zero_shot(reference, base, tokenizer, data)
        print(f"zero-shot with an instruction: {baseline}", flush=True)
        rows.append({"method": "zero-shot base + instruction", "library": "-", **baseline})
        for method in args.methods:
            config = settings_for(method, args, data_path, Path(scratch) / method)
            ours = softprompt_run(config)
            plot = ours.pop("plot")
            if plot is not None:
                shutil.copyfile(plot, harness.RESULTS_DIR / f"{args.name}_curves_{method}.png")
            details[method] = {"settings": config.flat(), "softprompt_epochs": ours.pop("epochs"),
                               "softprompt_step_losses": ours.pop("step_losses")}
            print(f"{method} softprompt: {ours}", flush=True)
            rows.append({"method": method, "library": "softprompt", **ours})
            if not args.no_peft and peft_config(config) is not None:
                theirs = peft_run(config)
                details[method]["peft_step_losses"] = theirs.pop("step_losses")
                theirs["steps_alike"] = steps_alike(details[method]["softprompt_step_losses"],
                                                    details[method]["peft_step_losses"])
                print(f"{method} PEFT: {theirs}", flush=True)
                rows.append({"method": method, "library": "PEFT", **theirs})
            write()


if __name__ == "__main__":
    main()
