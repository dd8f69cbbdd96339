"""The catalogue of bad inputs: what a demanding user can hand softprompt (flags, config files, data, adapter and
checkpoint files, run directories, Python calls), each with the message it must get, and proof that nothing was
written or changed.

Every case works in its own folder holding a copy of one finished run (`finished_run`). The whole folder is
snapshotted (every path, with the size and SHA-256 of every file) after the case has prepared its bad input and
again after softprompt refused it; the two must be equal. Command-line cases must exit with status 2 and print the
message; Python cases must raise it.

Cases marked "defect N" reproduce the issue's defects (they failed before the fix, but for the three the restructure
had already fixed, as marked); the others already gave good messages and are kept here so that they keep doing so.
Data errors with a new output directory also show defect 7: a failed run used to leave base-model/ and
train_config.json there.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from softprompt import AdapterFormatError, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, SoftPromptModel
from softprompt.data import DataError, collate
from softprompt.quickstart import build_tiny_bloom, build_tokenizer
from softprompt.training import ConfigError, TrainConfig
from softprompt.training.checkpoint import CheckpointError, load_checkpoint
from softprompt.training.run_lock import acquire_run_lock

from catalogue import (
    RUN_FLAGS,
    Catalogue,
    CommandFailed,
    Env,
    Unpickled,
    cli,
    damage_every_checkpoint,
    edit_checkpoint_state,
    edit_json,
    rewrite_adapter_tensors,
    rewrite_adapter_weights,
    rewrite_checkpoint_file,
    run_case,
    train_cli,
    write_file,
    write_json,
)

catalogue = Catalogue()
case = catalogue.case
CASES = catalogue.cases

# ------------------------------------------------------------------------------------------------ train: settings

for flags, message in [
    (["--batch-size", "0"], r"batch_size=0: expected an integer >= 1\. Fix: pass e\.g\. --batch-size 1"),
    (["--learning-rate", "-1"], r"learning_rate=-1\.0: expected a positive finite number"),
    (["--learning-rate", "nan"], r"learning_rate=nan: expected a positive finite number"),
    (["--eval-fraction", "1"], r"eval_fraction=1\.0: expected a fraction in \[0, 1\)"),
    (["--keep-last", "0"], r"keep_last=0: expected an integer >= 1"),
    (["--resume", "--overwrite"], r"pass only one of --resume / --overwrite"),
    (["--num-virtual-tokens", "0"], r"num_virtual_tokens=0: expected an integer >= 1"),
    (["--dataset", "some.csv"], r"dataset=\['some\.csv'\] without text_column.*Fix: pass --text-column"),
    (["--method", "prefix-tuning", "--prompt-tuning-init", "TEXT"],
     r"applies to prompt tuning / multitask prompt tuning only"),
    # defect 9: RANDOM init silently ignored an init text
    (["--prompt-tuning-init", "RANDOM", "--prompt-tuning-init-text", "Classify:"],
     r"prompt_tuning_init_text='Classify:' with prompt_tuning_init=RANDOM: the text would be ignored.*Fix: pass "
     r"prompt_tuning_init='TEXT'"),
    (["--encoder-dropout", "1.5", "--method", "p-tuning"], r"encoder_dropout=1\.5: expected a probability in \[0, 1\)"),
    # defect 6: a 10**9-token table was a MemoryError
    (["--num-virtual-tokens", "1000000000"],
     r"num_virtual_tokens=1000000000: its \[1000000000, 64\] fp32 table needs 238\.4 GiB, more than the .* GiB of "
     r"memory on cpu.*Fix: pass e\.g\. num_virtual_tokens=20"),
    (["--model", "/nowhere/model"], r"Could not load the model '/nowhere/model'.*leave --model out"),
]:
    def act(env: Env, flags: list[str] = flags) -> None:
        train_cli(env, *flags)

    case(f"train {' '.join(flags)}", CommandFailed, rf"exit 2: softprompt train: error: .*{message}")(act)


@case("train --device cuda without CUDA", CommandFailed, r"device='cuda' but torch sees no CUDA device\. Fix: pass "
      r"--device cpu")
def _(env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    train_cli(env, "--device", "cuda")


@case("train --loss-implementation triton on CPU (defect 6: refused only after the first evaluation)", CommandFailed,
      r"exit 2: .*loss_implementation='triton' cannot run here: the Triton kernels need CUDA tensors and the tensors are "
      r"on cpu.*Fix: pass --loss-implementation torch")
def _(env):
    import softprompt.kernels.linear_cross_entropy_triton as kernels

    # The test session runs the kernels under the CPU interpreter; a user's CPU process does not.
    env.monkeypatch.setattr(kernels, "kernels_interpreted", lambda: False)
    train_cli(env, "--loss-implementation", "triton")


for name, text, message in [
    ("run.yaml", "output_dir: 123\n", r"output_dir=123 \(int\): expected a string or nothing\. Fix: quote it"),  # defect 6
    ("run.yaml", "model: 7\n", r"model=7 \(int\): expected a string or nothing"),
    ("run.yaml", "task_column: 3\n", r"task_column=3 \(int\): expected a string or nothing"),
    ("run.yaml", "dataset_config: [a, b]\n", r"dataset_config=\['a', 'b'\] \(list\): expected a string or nothing\. "
                                             r"Fix: give one string"),
    ("run.yaml", "method: lora\n", r"method='lora': expected one of prompt-tuning, p-tuning, prefix-tuning"),
    ("run.yaml", "learning_rat: 0.1\n", r"unknown setting 'learning_rat'\. Expected one of:"),
    ("run.yaml", "padding: right\n", r"padding='right': expected one of longest, max_length"),
    ("run.yaml", "resume: 'yes'\n", r"resume='yes': expected true or false"),
    ("run.yaml", "optimization: 3\n", r"optimization=3: expected a mapping of optimization settings"),
    ("run.yaml", "learning_rate: [0.1\n", r"cannot be parsed.*Fix: correct its syntax"),
    ("run.yaml", "- 1\n- 2\n", r"holds a list: expected a mapping of field names to values"),
    ("run.txt", "learning_rate: 0.1\n", r"has the extension '\.txt': expected \.yaml, \.yml or \.json"),
    ("run.json", '{"batch_size": 0,', r"cannot be parsed"),
]:
    def act(env: Env, name: str = name) -> None:
        # No --output-dir: the file's must count (a run it let through would write under the case's folder).
        cli("train", *RUN_FLAGS, "--config", env.root / name)

    case(f"train --config {name}: {text.strip()}", CommandFailed, rf"(?s)exit 2: .*{message}",
         prepare=lambda env, name=name, text=text: write_file(env, name, text))(act)


@case("train --config missing.yaml", CommandFailed, r"exit 2: .*missing\.yaml' does not exist\. Fix: check the path")
def _(env):
    train_cli(env, "--config", env.root / "missing.yaml")


# ------------------------------------------------------------------------------------------------ train: data
# Data errors come after the base model is loaded: the new output directory must still not exist (defect 7: a
# failed run left base-model/ and train_config.json).

for name, text, flags, message in [
    ("rows.jsonl", '{"text": "hello", "label": "yes"}\n{"text": " ", "label": "no"}\n',
     ["--text-column", "text", "--label-column", "label"],
     r"Row 1, column 'text' is empty: expected a non-empty string"),  # defect 9: empty texts were accepted
    ("rows.csv", "text,label\nhello,yes\nbye,\nok,no\n", ["--text-column", "text", "--label-column", "label"],
     r"Row 1, column 'label': expected text, got None"),
    ("rows.jsonl", '{"text": "a", "label": ""}\n{"text": "b", "label": "no"}\n',
     ["--text-column", "text", "--label-column", "label"], r"Row 0, column 'label' is empty"),
    ("rows.csv", "text,label\nhello,yes\nbye,no\n", ["--text-column", "tweet", "--label-column", "label"],
     r"Column 'tweet' is not in the data; available columns: \['text', 'label'\].*--text-column"),
    ("rows.csv", "text,label\n", ["--text-column", "text"], r"has no rows: expected at least one"),
    ("rows.txt", "hello\n", ["--text-column", "text"], r"has the unsupported extension '\.txt'"),
    ("rows.csv", "text,label\nhello," + "very long label " * 20 + "\n", ["--text-column", "text", "--label-column",
                                                                         "label", "--max-length", "16"],
     r"Row 0: the label .* exceeds max_length=16\. Fix: raise max_length"),
    ("rows.csv", "text,label\nhello,yes\n", ["--text-column", "text", "--label-column", "label"],
     r"leaves no training rows\. Fix: lower --eval-fraction"),
]:
    def act(env: Env, name: str = name, flags: list[str] = flags) -> None:
        train_cli(env, "--dataset", env.root / name, *flags)

    case(f"train --dataset {name}: {message[:40]}", CommandFailed, rf"exit 2: .*{message}",
         prepare=lambda env, name=name, text=text: write_file(env, name, text))(act)


@case("train --dataset missing.csv", CommandFailed, r"Data file '.*missing\.csv' does not exist")
def _(env):
    train_cli(env, "--dataset", env.root / "missing.csv", "--text-column", "text")


# ------------------------------------------------------------------------------------------------ train: run directory


@case("train --output-dir FILE", CommandFailed, r"output_dir='.*a-file' is a file: expected a directory",
      prepare=lambda env: (env.root / "a-file").write_text("notes"))
def _(env):
    train_cli(env, output_dir=env.root / "a-file")


@case("train into a finished run", CommandFailed,
      r"already holds a run \(2 checkpoint\(s\) \(newest step-00000003\), adapter/, base-model/, train_config\.json, "
      r"metrics\.jsonl with 3 training step\(s\), curves\.png\)\. Fix: pass --resume to continue it, --overwrite")
def _(env):
    train_cli(env, output_dir=env.run)


@case("train into a finished run whose checkpoints were deleted (defect 3)", CommandFailed,
      r"already holds a run \(adapter/, base-model/, train_config\.json, metrics\.jsonl with 3 training step\(s\), "
      r"curves\.png\)", prepare=lambda env: shutil.rmtree(env.run / "checkpoints"))
def _(env):
    train_cli(env, output_dir=env.run)


@case("train into a finished run whose manifests were deleted (defect 3)", CommandFailed,
      r"already holds a run \(2 checkpoint\(s\)", prepare=lambda env: [(c / "manifest.json").unlink()
                                                                   for c in env.checkpoints])
def _(env):
    train_cli(env, output_dir=env.run)


@case("train --resume with another seed (defect 1: train_config.json was overwritten)", CommandFailed,
      r"step-00000003 was written with other settings \(seed: 0 in the checkpoint, 3 now\)\. Fix: resume with the "
      r"same settings")
def _(env):
    train_cli(env, "--resume", "--seed", "3", output_dir=env.run)


@case("train --resume with every checkpoint damaged (defect 4: started from scratch)", CommandFailed,
      r"--resume: no usable checkpoint in .*checkpoints' \(step-00000003: .*differs from the manifest.*; "
      r"step-00000002: .*\)\. The directory holds .*adapter/.*starting from scratch would throw that away\. Fix: "
      r"repair the checkpoint .* or start over with --overwrite", prepare=damage_every_checkpoint)
def _(env):
    train_cli(env, "--resume", output_dir=env.run)


@case("train --resume with the checkpoints deleted but the adapter there (defect 4)", CommandFailed,
      r"no usable checkpoint in .* \(there is no checkpoint\)\. The directory holds adapter/",
      prepare=lambda env: shutil.rmtree(env.run / "checkpoints"))
def _(env):
    train_cli(env, "--resume", output_dir=env.run)


@case("train --resume with checkpoint manifests of format_version 0", CommandFailed,
      r"no usable checkpoint .*manifest\.json: format_version 0: expected an integer from 1 to 1",
      prepare=lambda env: [edit_json(c / "manifest.json", lambda m: m.update(format_version=0)) for c in env.checkpoints])
def _(env):
    train_cli(env, "--resume", output_dir=env.run)


@case("train --resume with pickles in place of the checkpoint tensors", CommandFailed,
      r"no usable checkpoint .*tensors\.safetensors: unreadable safetensors",
      prepare=lambda env: [rewrite_checkpoint_file(c, "tensors.safetensors",
                                                   pickle.dumps(Unpickled(env.root / "UNPICKLED")))
                           for c in env.checkpoints])
def _(env):
    train_cli(env, "--resume", output_dir=env.run)


@case("train in a directory another run holds (defect 2: no lock)", CommandFailed,
      lambda env: rf"is in use by another softprompt run: pid {os.getpid()} on {socket.gethostname()}, started .*"
                  rf"Fix: wait for it to end \(or stop it: kill {os.getpid()}\)",
      prepare=lambda env: env.cleanup.append(acquire_run_lock(env.run).release))
def _(env):
    train_cli(env, "--resume", output_dir=env.run)


@case("train --overwrite with a data file that does not exist (the old run must survive the refusal)", CommandFailed,
      r"Data file '.*missing\.csv' does not exist")
def _(env):
    train_cli(env, "--overwrite", "--dataset", env.root / "missing.csv", "--text-column", "text", output_dir=env.run)


@case("train --overwrite with a table too large for memory (the old run must survive the refusal)", CommandFailed,
      r"num_virtual_tokens=1000000000: its \[1000000000, 64\] fp32 table needs")
def _(env):
    train_cli(env, "--overwrite", "--num-virtual-tokens", "1000000000", output_dir=env.run)


# ------------------------------------------------------------------------------------------------ checkpoints (Python)

for id, edit, message in [
    ("position.order not a list", lambda s: s["position"].update(order="all"),
     r"position\.order is 'all': expected a list of row indices"),
    ("metrics_bytes negative", lambda s: s.update(metrics_bytes=-5), r"metrics_bytes is -5: expected a byte count"),
    ("format_version -7", lambda s: s.update(format_version=-7),
     r"format_version -7: expected an integer from 1 to 1\. The file was edited or not written by softprompt"),
    ("step of another checkpoint", lambda s: s.update(step=99), r"step is 99: expected 3, the manifest's step"),
    ("no rng", lambda s: s.pop("rng"), r"rng is None: expected an object with the python and numpy states"),
]:
    def act(env: Env) -> None:
        load_checkpoint(env.checkpoints[-1])

    case(f"checkpoint state.json: {id}", CheckpointError, rf"state\.json: {message}\. The checkpoint is damaged",
         prepare=lambda env, edit=edit: edit_checkpoint_state(env.checkpoints[-1], edit))(act)


@case("checkpoint renamed to another step", CheckpointError,
      r"records step 3 in a directory named 'step-00000009'.*Fix: give it back its name",
      prepare=lambda env: env.checkpoints[-1].rename(env.run / "checkpoints" / "step-00000009"))
def _(env):
    load_checkpoint(env.run / "checkpoints" / "step-00000009")


@case("checkpoint manifest without state.json", CheckpointError, r"manifest\.json: does not list state\.json",
      prepare=lambda env: edit_json(env.checkpoints[-1] / "manifest.json", lambda m: m["files"].pop("state.json")))
def _(env):
    load_checkpoint(env.checkpoints[-1])


@case("checkpoint manifest listing a path outside it", CheckpointError,
      r"lists '\.\./\.\./train_config\.json', a path outside the checkpoint",
      prepare=lambda env: edit_json(env.checkpoints[-1] / "manifest.json", lambda m: m["files"].update(
          {"../../train_config.json": {"bytes": 1, "sha256": "0" * 64}})))
def _(env):
    load_checkpoint(env.checkpoints[-1])


# ------------------------------------------------------------------------------------------------ eval and generate


def corrupt_run_config(env: Env) -> None:
    (env.run / "train_config.json").write_text('{"split": "train[:24]", "seed"')


@case("eval with a corrupt train_config.json (defect 6: the file was not named)", CommandFailed,
      r"exit 2: softprompt eval: error: .*run/train_config\.json: not valid JSON .*the file is corrupt.*Fix: restore it",
      prepare=corrupt_run_config)
def _(env):
    cli("eval", "--adapter", env.adapter)


@case("eval with an invalid value in train_config.json", CommandFailed,
      r"exit 2: .*run/train_config\.json: eval_batch_size=0: expected an integer >= 1",
      prepare=lambda env: edit_json(env.run / "train_config.json",
                                    lambda c: c["optimization"].update(eval_batch_size=0)))
def _(env):
    cli("eval", "--adapter", env.adapter)


def write_lora_directory(env: Env) -> None:
    (env.root / "lora").mkdir()
    write_json(env.root / "lora" / "adapter_config.json",
               {"peft_type": "LORA", "base_model_name_or_path": "bigscience/bloomz-560m", "r": 8})


@case("eval a PEFT LoRA directory without --model (defect 6: 'base model (None) is not available')",
      CommandFailed, r"lora/adapter_config\.json: a PEFT LORA adapter: expected a soft-prompt adapter",
      prepare=write_lora_directory)
def _(env):
    cli("eval", "--adapter", env.root / "lora")


@case("generate with a PEFT LoRA directory and --model", CommandFailed,
      r"format None: expected 'softprompt-adapter'\. It is a PEFT LORA adapter, not a soft prompt",
      prepare=write_lora_directory)
def _(env):
    cli("generate", "--adapter", env.root / "lora", "--model", env.run / "base-model", "--prompt", "hi")


@case("eval a directory that does not exist", CommandFailed, r"exit 2: .*nowhere: adapter directory not found")
def _(env):
    cli("eval", "--adapter", env.root / "nowhere")


@case("eval on a file without the text column", CommandFailed, r"Column 'text' is not in the data",
      prepare=lambda env: write_file(env, "other.jsonl", '{"tweet": "hi", "label": "complaint"}\n'))
def _(env):
    cli("eval", "--adapter", env.adapter, "--dataset", env.root / "other.jsonl", "--text-column", "text",
        "--label-column", "label")


@case("eval a moved run without its base", CommandFailed,
      r"the base model it was trained on \('/gone/base-model'\) is not available here\. Fix: pass --model",
      prepare=lambda env: (shutil.rmtree(env.run / "base-model"), edit_json(
          env.adapter / "adapter_config.json", lambda d: d["base_model"].update(name_or_path="/gone/base-model"))))
def _(env):
    cli("eval", "--adapter", env.adapter)


for flags, message in [
    (["--prompt", ""], r"prompt 1 \(''\) encodes to no token: expected some text to continue\. Fix: pass a non-empty "
                       r"--prompt"),  # defect 6: "cannot reshape a tensor of 0 elements"
    (["--prompt", "hi", "--prompt", ""], r"prompt 2 \(''\) encodes to no token"),
    (["--prompt", "hi", "--num-beams", "0"], r"num_beams=0: expected an integer >= 1"),  # defect 6: ZeroDivisionError
    (["--prompt", "hi", "--do-sample", "--top-p", "2"], r"top_p=2\.0: expected a probability in \(0, 1\]"),  # defect 6
    (["--prompt", "hi", "--do-sample", "--temperature", "0"], r"temperature=0\.0: expected a positive finite number"),
    (["--prompt", "hi", "--repetition-penalty", "-1"], r"repetition_penalty=-1\.0: expected a positive finite number"),
    (["--prompt", "hi", "--top-k", "-1"], r"top_k=-1: expected an integer >= 0"),
    (["--prompt", "hi", "--max-new-tokens", "0"], r"max_new_tokens=0: expected an integer >= 1"),
    (["--prompt", "hi", "--use", "nope"], r"--use \['nope'\]: not among the adapters \['adapter'\]"),
]:
    def act(env: Env, flags: list[str] = flags) -> None:
        cli("generate", "--adapter", env.adapter, *flags)

    case(f"generate {' '.join(flags)}", CommandFailed, rf"exit 2: softprompt generate: error: {message}")(act)


@case("generate with two adapters of one name", CommandFailed, r"the name 'adapter' is already used by")
def _(env):
    cli("generate", "--adapter", env.adapter, "--adapter", env.adapter, "--prompt", "hi")


# ------------------------------------------------------------------------------------------------ adapter files


def load(env: Env, directory: Path | None = None) -> None:
    SoftPromptModel.from_pretrained(env.base, directory or env.adapter, format="softprompt")


def save_p_tuning(env: Env) -> Path:
    directory = env.root / "p-tuning"
    SoftPromptModel(env.base, PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=16)).save_pretrained(directory)
    return directory


def stored_output_only(env: Env, shape: tuple[int, int]) -> None:
    """defect 5: an adapter that claims to be its stored output only, with an output of another shape."""
    directory = save_p_tuning(env)
    edit_json(directory / "adapter_config.json", lambda d: d.update(encoder_weights=False))
    rewrite_adapter_tensors(directory, lambda t: t.update(materialized=torch.randn(shape)))


@case("adapter: stored output [5, 64] under a 20-token config (defect 5, refused since the restructure)", AdapterFormatError,
      r"'materialized' has shape \(5, 64\): expected \[num_virtual_tokens, width\] = \(20, 64\)",
      prepare=lambda env: stored_output_only(env, (5, 64)))
def _(env):
    load(env, env.root / "p-tuning")


@case("adapter: stored output [20, 32] for a 64-wide base (defect 5, refused since the restructure)", AdapterFormatError,
      r"'materialized' has shape \(20, 32\): expected .* = \(20, 64\)",
      prepare=lambda env: stored_output_only(env, (20, 32)))
def _(env):
    load(env, env.root / "p-tuning")


for id, edit, message in [
    ("format_version 0 (defect 5)", lambda d: d.update(format_version=0),
     r"format_version 0: expected an integer from 1 to 1"),
    ("format_version -7 (defect 5)", lambda d: d.update(format_version=-7), r"format_version -7: expected an integer"),
    ("format_version true", lambda d: d.update(format_version=True), r"format_version True: expected an integer"),
    ("format_version 2", lambda d: d.update(format_version=2),
     r"format_version 2: this softprompt reads versions up to 1\. Fix: upgrade softprompt"),
    ("weights record without bytes and sha256 (defect 5)", lambda d: d.update(weights={"file": "adapter.safetensors"}),
     r"the weights record .* lacks a valid size \('bytes', an integer\) and SHA-256"),
    ("weights record with a malformed sha256", lambda d: d["weights"].update(sha256="abc"), r"lacks a valid size"),
    ("weights file outside the directory", lambda d: d["weights"].update(file="../run/adapter/adapter.safetensors"),
     r"weights file '\.\./run/adapter/adapter\.safetensors': expected a file name in the adapter directory"),
    ("encoder_weights 'yes'", lambda d: d.update(encoder_weights="yes"),
     r"encoder_weights is 'yes': expected a JSON true or false"),
    ("config a list", lambda d: d.update(config=[8]), r"config is \[8\]: expected a JSON object"),
    ("unknown method", lambda d: d.update(method="lora"), r"unknown method 'lora': expected one of"),
    ("unknown config field", lambda d: d["config"].update(rank=8), r"unknown prompt_tuning config fields \['rank'\]"),
    ("config value the method refuses", lambda d: d["config"].update(num_virtual_tokens=0),
     r"invalid prompt_tuning config: num_virtual_tokens=0: expected a positive int"),
    ("format of another library", lambda d: d.update(format="something-else"),
     r"format 'something-else': expected 'softprompt-adapter'"),
    ("another base shape", lambda d: d["base_model"].update(hidden_size=128),
     r"adapter made for another base model shape: hidden_size 128 \(adapter\) vs 64 \(base model\)"),
]:
    def act(env: Env) -> None:
        load(env)

    case(f"adapter_config.json: {id}", AdapterFormatError, message,
         prepare=lambda env, edit=edit: edit_json(env.adapter / "adapter_config.json", edit))(act)


for id, prepare, message in [
    ("adapter_config.json not JSON", lambda env: (env.adapter / "adapter_config.json").write_text('{"format": "soft'),
     r"adapter_config\.json: not valid JSON"),
    ("adapter_config.json missing", lambda env: (env.adapter / "adapter_config.json").unlink(),
     r"adapter_config\.json: file not found"),
    ("weights missing", lambda env: (env.adapter / "adapter.safetensors").unlink(),
     r"adapter\.safetensors: file not found"),
    ("weights truncated", lambda env: (env.adapter / "adapter.safetensors").write_bytes(
        (env.adapter / "adapter.safetensors").read_bytes()[:100]),
     r"adapter\.safetensors: 100 bytes, but the adapter config records \d+: the file is truncated"),
    ("weights corrupt at the same size", lambda env: (env.adapter / "adapter.safetensors").write_bytes(
        (env.adapter / "adapter.safetensors").read_bytes()[:-1] + b"\x00"), r"SHA-256 differs"),
    ("a pickle in place of the weights, never unpickled",
     lambda env: rewrite_adapter_weights(env.adapter, pickle.dumps(Unpickled(env.root / "UNPICKLED"))),
     r"adapter\.safetensors: not a readable safetensors file"),
    ("NaN weights", lambda env: rewrite_adapter_tensors(
        env.adapter, lambda t: t.update(materialized=torch.full_like(t["materialized"], float("nan")))),
     r"tensor 'materialized' holds NaN or infinite values"),
    ("integer weights", lambda env: rewrite_adapter_tensors(
        env.adapter, lambda t: t.update({"prompt.embedding.weight": t["prompt.embedding.weight"].long()})),
     r"tensor 'prompt\.embedding\.weight' holds dtype torch\.int64"),
    ("no stored output", lambda env: rewrite_adapter_tensors(env.adapter, lambda t: t.pop("materialized")),
     r"the tensor 'materialized' is missing"),
]:
    def act(env: Env) -> None:
        load(env)

    case(f"adapter files: {id}", AdapterFormatError, message, prepare=prepare)(act)


@case("adapter: a PEFT directory given to softprompt's loader", AdapterFormatError,
      r"looks like a PEFT adapter: use SoftPromptModel\.from_pretrained",
      prepare=lambda env: SoftPromptModel(env.base, PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(
          env.root / "peft", format="peft"))
def _(env):
    load(env, env.root / "peft")


@case("adapter: a PEFT adapter for another base shape", AdapterFormatError,
      r"adapter made for another base model shape: hidden_size 64 \(adapter\) vs 48 \(base model\)",
      prepare=lambda env: SoftPromptModel(env.base, PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(
          env.root / "peft", format="peft"))
def _(env):
    SoftPromptModel.from_pretrained(build_tiny_bloom(300, hidden_size=48, n_layer=2, n_head=4), env.root / "peft", format="peft")


# ------------------------------------------------------------------------------------------------ the Python API

IDS = torch.tensor([[5, 6, 7, 8]])


def prompt_model(env: Env) -> SoftPromptModel:
    return SoftPromptModel(env.base, PromptTuningConfig(num_virtual_tokens=3))


vocab = lambda env: env.base.get_input_embeddings().weight.shape[0]  # noqa: E731

for id, call, error, message in [
    ("SoftPromptModel(None, config) (defect 6, a TypeError with its fix since the restructure)", lambda env: SoftPromptModel(None, PromptTuningConfig(num_virtual_tokens=3)),
     TypeError, r"base_model=NoneType: expected a transformers causal LM\. Fix: SoftPromptModel\("),
    ("SoftPromptModel(base, None)", lambda env: SoftPromptModel(env.base, None), ValueError,
     r"config of type NoneType: expected PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig"),
    ("a 10**9-token table (defect 6: MemoryError)",
     lambda env: SoftPromptModel(env.base, PrefixTuningConfig(num_virtual_tokens=10**9)), ValueError,
     r"num_virtual_tokens=1000000000: its \[1000000000, 256\] fp32 table needs .* GiB, more than"),
    ("forward with an id past the vocabulary (defect 6: IndexError)",
     lambda env: prompt_model(env)(torch.tensor([[5, vocab(env)]])), ValueError,
     r"input_ids holds the token id \d+ \(row 0, position 1\): expected ids in \[0, \d+\)"),
    ("generate with a negative id (defect 6)",
     lambda env: prompt_model(env).generate(input_ids=torch.tensor([[-1, 5]]), max_new_tokens=2), ValueError,
     r"input_ids holds the token id -1 \(row 0, position 0\)"),
    ("compute_loss with a label past the vocabulary (defect 6)",
     lambda env: prompt_model(env).compute_loss(IDS, None, torch.tensor([[5, 6, vocab(env) + 3, -100]])), ValueError,
     r"labels holds \d+ \(row 0, position 2\): expected a token id in \[0, \d+\) or -100"),
    ("forward with a negative label (defect 6)",
     lambda env: prompt_model(env)(IDS, labels=torch.tensor([[5, -2, 7, 8]])), ValueError, r"labels holds -2"),
    ("compute_loss with labels of another shape",
     lambda env: prompt_model(env).compute_loss(IDS, None, IDS[:, :2]), ValueError,
     r"labels has shape \(1, 2\): expected the shape of input_ids \(1, 4\)"),
    ("input_ids a list", lambda env: prompt_model(env)([[5, 6]]), ValueError,
     r"input_ids of type list: expected a torch\.Tensor \[B, T\] of token ids"),
    ("input_ids one-dimensional", lambda env: prompt_model(env).generate(input_ids=torch.tensor([5, 6])), ValueError,
     r"input_ids has shape \(2,\): expected \[B, T\].*unsqueeze\(0\)"),
    ("float input_ids", lambda env: prompt_model(env)(IDS.float()), ValueError,
     r"input_ids has dtype torch\.float32: expected integer token ids"),
    ("an empty prompt tensor (defect 6)", lambda env: prompt_model(env).generate(
        input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2), ValueError,
     r"input_ids has shape \(1, 0\): expected at least one token per row"),
    ("attention_mask of another shape", lambda env: prompt_model(env)(IDS, torch.ones(1, 3, dtype=torch.long)),
     ValueError, r"attention_mask has shape \(1, 3\): expected the shape of input_ids \(1, 4\)"),
    ("attention_mask with a 2", lambda env: prompt_model(env)(IDS, torch.tensor([[1, 1, 2, 1]])), ValueError,
     r"attention_mask holds the value 2: expected 1 for real tokens and 0 for padding"),
    ("generate num_beams=0 (defect 6)", lambda env: prompt_model(env).generate(input_ids=IDS, num_beams=0),
     ValueError, r"num_beams=0: expected an integer >= 1"),
    ("generate top_p=2 (defect 6)", lambda env: prompt_model(env).generate(input_ids=IDS, do_sample=True, top_p=2.0),
     ValueError, r"top_p=2\.0: expected a probability in \(0, 1\]"),
    ("generate inputs_embeds", lambda env: prompt_model(env).generate(input_ids=IDS, inputs_embeds=torch.zeros(1)),
     ValueError, r"generate\(inputs_embeds=\.\.\.\) is not supported"),
    ("forward with a cache", lambda env: prompt_model(env)(IDS, past_key_values=None), ValueError,
     r"forward got past_key_values: it builds the embeddings, the cache and the positions itself"),
    ("compute_loss implementation='cuda'", lambda env: prompt_model(env).compute_loss(IDS, None, IDS, implementation="cuda"),
     ValueError, r"implementation='cuda': expected 'torch', 'triton' or 'full'"),
    ("an unknown adapter name", lambda env: prompt_model(env)(IDS, adapter_names=["nope"]), ValueError,
     r"Unknown adapter name\(s\) \['nope'\]: loaded adapters are \['default'\]"),
    ("PromptTuningConfig(num_virtual_tokens=0)", lambda env: PromptTuningConfig(num_virtual_tokens=0), ValueError,
     r"num_virtual_tokens=0: expected a positive int"),
    ("PromptTuningConfig RANDOM with an init text (defect 9)",
     lambda env: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM", prompt_tuning_init_text="hi"),
     ValueError, r"prompt_tuning_init_text='hi' with prompt_tuning_init=RANDOM: the text would be ignored"),
    ("PromptTuningConfig SAMPLE_VOCAB with an init text (defect 9)",
     lambda env: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB", prompt_tuning_init_text="x"),
     ValueError, r"with prompt_tuning_init=SAMPLE_VOCAB: the text would be ignored"),
    ("PromptTuningConfig unknown init", lambda env: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="ZERO"),
     ValueError, r"prompt_tuning_init='ZERO': expected one of RANDOM, TEXT, SAMPLE_VOCAB"),
    ("TEXT init without a tokenizer", lambda env: SoftPromptModel(env.base, PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")), ValueError,
     r"prompt_tuning_init=TEXT needs a tokenizer, got tokenizer=None"),
    ("PromptEncoderConfig unknown encoder", lambda env: PromptEncoderConfig(
        num_virtual_tokens=4, encoder_reparameterization_type="GRU"), ValueError,
     r"encoder_reparameterization_type='GRU': expected 'MLP' or 'LSTM'"),
    ("TrainConfig output_dir=123 (defect 6)", lambda env: TrainConfig.from_dict({"output_dir": 123}),
     ConfigError, r"output_dir=123 \(int\): expected a string or nothing"),
    ("collate of no examples", lambda env: collate([], pad_token_id=3), DataError,
     r"examples is empty: expected at least one example"),
]:
    case(f"python: {id}", error, message)(call)


@case("python: compute_loss implementation='triton' on CPU without the interpreter (defect 6)", ValueError,
      r"loss_implementation='triton' cannot run here: the Triton kernels need CUDA tensors")
def _(env):
    import softprompt.kernels.linear_cross_entropy_triton as kernels

    env.monkeypatch.setattr(kernels, "kernels_interpreted", lambda: False)
    prompt_model(env).compute_loss(IDS, None, IDS, implementation="triton")


@case("python: generate_texts with an empty prompt (defect 6)", ValueError, r"prompt 2 \(''\) encodes to no token")
def _(env):
    from softprompt.training import generate_texts

    generate_texts(prompt_model(env), build_tokenizer(padding_side="left"), ["hi", ""], "default", max_new_tokens=2)


@case("python: resolve_base_model of a PEFT LoRA directory (defect 6)", AdapterFormatError,
      r"a PEFT LORA adapter: expected a soft-prompt adapter", prepare=write_lora_directory)
def _(env):
    from softprompt.training import resolve_base_model

    resolve_base_model(env.root / "lora")


@case("python: run_config_for_adapter with a corrupt train_config.json (defect 6)", ConfigError,
      r"run/train_config\.json: not valid JSON", prepare=corrupt_run_config)
def _(env):
    from softprompt.training import run_config_for_adapter

    run_config_for_adapter(env.adapter)


# ------------------------------------------------------------------------------------------------ the test


def test_the_catalogue_holds_every_kind_of_bad_input():
    assert len(CASES) >= 60, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES), "two cases share an id"


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_gets_its_message_and_changes_nothing(bad, finished_run, run_base, tmp_path, monkeypatch):
    run_case(bad, finished_run, run_base, tmp_path, monkeypatch)
