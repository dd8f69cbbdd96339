"""The `softprompt` command: the no-argument default end to end, each method's default, config file precedence,
`eval`, `generate`, the seed recipe's hub code path (with the hub faked), and help for every subcommand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt.cli import build_parser, main, train_config_from_args
from softprompt.methods import METHODS
from softprompt.training import TrainConfig
from softprompt.training import read_metrics

SHORT = ["--split", "train[:60]", "--num-generations", "0", "--no-progress"]


def evaluations(run: Path) -> list[dict]:
    return [record for record in read_metrics(run / "metrics.jsonl") if record["event"] == "eval"]


# ------------------------------------------------------------------------------------------------ the default run


def test_softprompt_train_with_no_arguments_runs_the_offline_default(tmp_path):
    """Exactly the quick start: `softprompt train` in an empty directory, no network. (How long it takes is measured
    in benchmarks/, not checked here.)"""
    completed = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", "train"], cwd=tmp_path, capture_output=True, text=True,
        # Only a hang guard, not a speed check: the run takes ~30 s, and a loaded machine may take several times that.
        timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    run = tmp_path / "softprompt-runs" / "prompt-tuning"
    for path in ("adapter/adapter.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "curves.png",
                 "base-model/config.json", "train_config.json"):
        assert (run / path).is_file(), path
    out = completed.stdout
    assert "adapter default: softprompt-runs/prompt-tuning/adapter" in out
    assert "metrics: softprompt-runs/prompt-tuning/metrics.jsonl" in out
    assert "plot: softprompt-runs/prompt-tuning/curves.png" in out
    assert "generations on held-out examples (greedy):" in out and out.count(" -> ") >= 4
    first, last = evaluations(run)[0], evaluations(run)[-1]
    assert last["epoch"] == 20 and last["loss"] < 0.5 * first["loss"], (first, last)


@pytest.mark.parametrize("method", [spec.cli_name for spec in METHODS.values() if spec.cli_name != "prompt-tuning"])
def test_the_default_run_learns_with_every_method(method, tmp_path, monkeypatch, capsys):
    """`softprompt train --method M` with nothing else (prompt tuning is the test above)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", method]) == 0
    run = tmp_path / "softprompt-runs" / method
    first, last = evaluations(run)[0], evaluations(run)[-1]
    if method == "cpt":
        # CPT moves its context's embeddings only within small L2 balls (opt_projection_epsilon): it refines in-context
        # learning, which a random 2-layer model does not do. Its loss falls, a little (measured 9.16 -> 8.82).
        assert last["loss"] < first["loss"] - 0.1, (first, last)
    else:
        assert last["loss"] < 0.5 * first["loss"] and last["accuracy"] > 0.8, (first, last)
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "curves.png").is_file()
    assert f"eval after training:  loss {last['loss']:.4f}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ flags and config


def test_every_config_field_has_a_train_flag():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    train_flags = {action.dest for action in subparsers.choices["train"]._actions}
    assert set(TrainConfig.field_names()) <= train_flags


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_override_the_config_file_which_overrides_the_defaults(suffix, tmp_path):
    values = {"learning-rate": 0.05, "method": "p-tuning", "num_epochs": 3, "text_column": ["quote"],
              "dataset": ["quotes.jsonl"]}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    args = build_parser().parse_args(["train", "--config", str(path), "--learning-rate", "0.01", "--resume"])
    config = train_config_from_args(args)
    assert config.optimization.learning_rate == 0.01  # flag
    assert (config.method, config.optimization.num_epochs, config.data.text_column) == ("p-tuning", 3, ["quote"])
    assert (config.optimization.batch_size, config.data.max_length) == (8, 64)  # defaults
    assert config.output.resume is True
    args = build_parser().parse_args(["train", "--config", str(path), "--no-resume", "--dataset", "other.csv"])
    assert train_config_from_args(args).data.dataset == ["other.csv"]


def test_a_bad_config_file_is_explained(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rat: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown setting 'learning_rat'. Expected one of:" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--batch-size", "0"]) == 2
    assert "batch_size=0: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "generate", "params"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: softprompt {command}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ eval and generate


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SHORT, "--method", "prefix-tuning", "--num-epochs", "3", "--output-dir", str(run)]) == 0
    return run


def test_eval_reproduces_the_runs_last_evaluation(trained_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--adapter", str(trained_run / "adapter"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = evaluations(trained_run)[-1]
    assert result["examples"] == 12
    # The same adapter, rows, batches and code: equal in practice; 1e-6 relative (a few fp32 ulps) allows only for
    # the eval running on another thread count than the run (BLAS blocking).
    assert result["loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert result["accuracy"] == last["accuracy"] and result["rank_accuracy"] == last["rank_accuracy"]
    assert main(["eval", "--adapter", str(trained_run / "adapter")]) == 0
    printed = capsys.readouterr().out
    assert "12 rows held out by the training run" in printed
    assert f"accuracy {last['accuracy']:.3f}, rank accuracy {last['rank_accuracy']:.3f}" in printed, printed


def loss_and_accuracy_row_by_row(adapter: Path, base_directory: Path, rows: list[dict], text_column: str,
                                 label_column: str) -> tuple[float, float, float]:
    """The classification recipe's loss and accuracies as the README describes them, computed without the eval
    code: one row at a time (no padding), the full-logits forward for the loss, plain greedy generation for the
    label, and every label of the rows scored by the full logits for rank classification.

    Prompt ``"{text_column} : {text} Label : "``, target = label ids + EOS; the loss is the mean over every target
    token of all rows; a row is correct when its generated text (special tokens dropped) is its label, and correct
    by rank when its label's target has the highest summed log-probability among all labels' targets.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt import SoftPromptModel

    tokenizer = AutoTokenizer.from_pretrained(base_directory)
    base = AutoModelForCausalLM.from_pretrained(base_directory).eval()
    model = SoftPromptModel.from_pretrained(base, adapter, format="softprompt").eval()
    targets = [tokenizer(row[label_column], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for row in rows]
    max_new_tokens = max(len(target) for target in targets)
    candidates = {row[label_column]: target for row, target in zip(rows, targets)}
    loss_sum, num_targets, correct, ranked_correct = 0.0, 0, 0, 0
    for row, target in zip(rows, targets):
        prompt = tokenizer(f"{text_column} : {row[text_column]} Label : ", add_special_tokens=False)["input_ids"]
        log_likelihoods = {}
        with torch.no_grad():
            loss = model(torch.tensor([prompt + target]), labels=torch.tensor([[-100] * len(prompt) + target])).loss
            for label, ids in candidates.items():
                label_loss = model(torch.tensor([prompt + ids]), labels=torch.tensor([[-100] * len(prompt) + ids])).loss
                log_likelihoods[label] = -float(label_loss) * len(ids)
        ranked_correct += max(log_likelihoods, key=log_likelihoods.get) == row[label_column]
        loss_sum += float(loss) * len(target)
        num_targets += len(target)
        generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        correct += tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True).strip() == row[label_column]
    return loss_sum / num_targets, correct / len(rows), ranked_correct / len(rows)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    """A run that has learned enough to get some held-out labels right and some wrong (p-tuning, 10 short epochs),
    so that an accuracy can be checked against another computation of it."""
    run = tmp_path_factory.mktemp("cli") / "learned"
    assert main(["train", *SHORT, "--method", "p-tuning", "--num-epochs", "10", "--output-dir", str(run)]) == 0
    return run


def test_eval_on_a_whole_split_of_another_file(learned_run, tmp_path, capsys):
    import csv

    from softprompt.quickstart import shipped_dataset_path

    with shipped_dataset_path("complaints").open(newline="") as file:
        shipped = list(csv.DictReader(file))[200:210]  # past train[:60]: rows the run never saw
    rows = [{"tweet": "my parcel is lost again", "label": "complaint"},
            {"tweet": "lovely service, thanks", "label": "no complaint"},
            *({"tweet": row["Tweet text"], "label": row["text_label"]} for row in shipped)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    code = main(["eval", "--adapter", str(learned_run / "adapter"), "--dataset", str(path), "--text-column", "tweet",
                 "--label-column", "label", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == len(rows)
    loss, accuracy, rank_accuracy = loss_and_accuracy_row_by_row(learned_run / "adapter", learned_run / "base-model",
                                                                 rows, "tweet", "label")
    assert 0 < accuracy < 1, "all right or all wrong: the accuracy comparison below would prove little"
    # fp32 on CPU: the eval batches and pads the rows and takes the label-only head, the reference runs each row
    # alone with full logits; that changes only summation order (measured: 5e-8 relative on a loss of 1.4). 1e-5
    # leaves 200x margin, while a wrong row, token or adapter moves the loss by 1e-2 or more.
    assert result["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["accuracy"] == accuracy  # the same greedy choices: the logits agree to ~1e-7
    assert result["rank_accuracy"] == rank_accuracy
    assert main(["eval", "--adapter", str(learned_run / "adapter"), "--dataset", str(path), "--text-column",
                 "text"]) == 2
    assert "Column 'text' is not in the data" in capsys.readouterr().err


def test_generate_with_several_adapters(trained_run, capsys):
    adapter = str(trained_run / "adapter")
    prompts = ["Tweet text : my bag is lost again Label : ", "Tweet text : great crew, thanks Label : "]
    capsys.readouterr()
    assert main(["generate", "--adapter", f"first={adapter}", "--adapter", f"second={adapter}", "--prompt",
                 prompts[0], "--prompt", prompts[1], "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] + "]" for line in lines] == ["[first]", "[first]", "[second]", "[second]"]
    assert lines[0].startswith(f"[first] {prompts[0]}")
    assert lines[0].removeprefix("[first]") == lines[2].removeprefix("[second]")  # same adapter, same text
    assert main(["generate", "--adapter", f"first={adapter}", "--adapter", f"second={adapter}", "--use", "second",
                 "--prompt", prompts[0], "--do-sample", "--temperature", "0.7", "--seed", "3"]) == 0
    assert [line[:8] for line in capsys.readouterr().out.splitlines()] == ["[second]"]
    assert main(["generate", "--adapter", adapter, "--use", "nope", "--prompt", "hi"]) == 2
    assert "--use ['nope']: not among the adapters ['adapter']" in capsys.readouterr().err


def test_generate_finds_the_base_of_a_moved_run_or_asks_for_it(trained_run, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained_run / "adapter", moved / "adapter")
    capsys.readouterr()
    shutil.copytree(trained_run / "base-model", moved / "base-model")
    config = json.loads((moved / "adapter" / "adapter_config.json").read_text())
    config["base_model"]["name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--adapter", str(moved / "adapter"), "--prompt", "Tweet text : hi Label : "]) == 0
    shutil.rmtree(moved / "base-model")
    assert main(["generate", "--adapter", str(moved / "adapter"), "--prompt", "hi"]) == 2
    assert "Fix: pass --model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ hub recipes


def test_the_seed_recipe_command_uses_the_hub_code_path(tmp_path, monkeypatch, capsys):
    """`softprompt train --model bigscience/bloomz-560m --dataset ought/raft ...` as documented, with the hub
    replaced by local stand-ins (no network here): the model and tokenizer go through from_pretrained, the data
    through datasets.load_dataset with the name, configuration and split."""
    import datasets
    import transformers

    from shipped_data import generate_complaints

    from softprompt.quickstart import save_tiny_bloom

    local_model = save_tiny_bloom(tmp_path / "stand-in-bloomz")
    hub_calls = []
    real_model, real_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(name, *args, **kwargs):
        hub_calls.append(("model", name, kwargs.get("dtype")))
        return real_model(local_model if name == "bigscience/bloomz-560m" else name, *args, **kwargs)

    def fake_tokenizer(name, *args, **kwargs):
        hub_calls.append(("tokenizer", name, kwargs.get("padding_side")))
        return real_tokenizer(local_model if name == "bigscience/bloomz-560m" else name, *args, **kwargs)

    def fake_load_dataset(name, config_name=None, *, split):
        hub_calls.append(("dataset", name, config_name, split))
        return datasets.Dataset.from_list(generate_complaints(50, seed=1))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    code = main(["train", "--model", "bigscience/bloomz-560m", "--dataset", "ought/raft", "--dataset-config",
                 "twitter_complaints", "--text-column", "Tweet text", "--label-column", "text_label", "--method",
                 "prompt-tuning", "--prompt-tuning-init", "TEXT", "--prompt-tuning-init-text",
                 "Classify if the tweet is a complaint or not:", "--num-epochs", "1", "--num-generations", "0",
                 "--no-progress", "--output-dir", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    import torch

    assert ("model", "bigscience/bloomz-560m", torch.float32) in hub_calls
    assert ("tokenizer", "bigscience/bloomz-560m", "left") in hub_calls
    assert ("dataset", "ought/raft", "twitter_complaints", "train") in hub_calls
    assert not (tmp_path / "run" / "base-model").exists()  # a hub base is not copied into the run
    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert recorded["name_or_path"] == str(local_model.resolve())


def test_an_unreachable_hub_model_is_explained(tmp_path, monkeypatch, capsys):
    import transformers

    def offline(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    assert main(["train", "--model", "bigscience/bloomz-560m", "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "Could not load the model 'bigscience/bloomz-560m'" in error and "leave --model out" in error
