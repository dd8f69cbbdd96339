"""Multitask prompt tuning: against PEFT with the same weights on every family, each row of a mixed batch against
itself alone, the method's plain reference, its inits (PEFT's, from the same seed, text or source file), both
formats, checkpointing, and the command line (one adapter, a task id per task of the data).

Shapes: B batch, T tokens, P virtual tokens, N tasks, r ranks.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file

import softprompt
from softprompt import MultitaskPromptTuningConfig, SoftPromptModel
from softprompt.cli import main
from softprompt.methods import multitask_prompt_tuning
from softprompt.multi_task import make_trainable
from softprompt.params import base_model_config, meta_base_model, parameter_counts
from softprompt.quickstart import build_tiny_model
from softprompt.training import TrainConfig, read_metrics, train

from helpers import (
    FAMILY_MODEL_TYPES,
    assert_checkpointing_changes_nothing,
    assert_resumes_bit_for_bit,
    gradient_isolation_errors,
    greedy_by_forward,
    random_batch,
)
from peft_reference import peft_config_for, peft_twin

# fp32 on CPU: the same kernels on the same numbers in both libraries; only summation orders differ (another batch
# size or key length), a few ulps of values of order 1-10.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB_SIZE = 300
PAD_ID = 3
GENERATION = dict(eos_token_id=None, pad_token_id=PAD_ID, do_sample=False)
CONFIG = MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=3, num_ranks=2)


def tiny_base(model_type: str) -> torch.nn.Module:
    return build_tiny_model(model_type, VOCAB_SIZE, seed=0)


def batch_of(lengths: list[int], padding: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(lengths, padding, seed, VOCAB_SIZE, PAD_ID)


def with_random_weights(model: SoftPromptModel, name: str = "default") -> SoftPromptModel:
    """Task matrices of order 1: at PEFT's init (std 0.02) every prompt is ~4e-4 * W, nearly zero, and would hide
    a wrong task, a wrong product or a dropped prompt."""
    module = model.prompts[name]
    with torch.no_grad():
        module.prefix_task_cols.normal_(0, 0.7)
        module.prefix_task_rows.normal_(0, 0.7)
    return model


# ------------------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_equals_peft_on_every_family(model_type):
    """Loss, real-position logits and gradients on a right-padded batch whose rows use different tasks, the training
    loss in both layouts, greedy ids (PEFT's forward token by token: its generate re-injects the virtual tokens at
    every step on transformers 5.24), and PEFT's parameter counts for a fresh config."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    fresh = SoftPromptModel(base, copy.deepcopy(CONFIG))
    assert fresh.num_parameters() == peft_twin(fresh, base).get_nb_trainable_parameters()
    ours = with_random_weights(fresh)
    theirs = peft_twin(ours, base)
    batch, task_ids = batch_of([7, 4, 6], "right"), torch.tensor([2, 0, 2])
    our_output, their_output = ours(**batch, task_ids=task_ids), theirs(**batch, task_ids=task_ids)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, 3:][real], **TOLERANCE)
    for layout in ("prefix", "sequence"):
        loss = ours.compute_loss(**batch, virtual_token_layout=layout, task_ids=task_ids)
        torch.testing.assert_close(loss, their_output.loss, **TOLERANCE, msg=layout)

    our_output.loss.backward()
    their_output.loss.backward()
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in ours.prompts["default"].named_parameters():
        their_gradient = their_parameters[f"prompt_encoder.default.{name}"].grad
        torch.testing.assert_close(parameter.grad, their_gradient, **TOLERANCE, msg=f"gradient of {name}")
    columns = ours.prompts["default"].prefix_task_cols.grad
    assert columns[[0, 2]].abs().sum(dim=(1, 2)).gt(0).all() and columns[1].abs().sum() == 0  # task 1: no row

    prompt = {key: value for key, value in batch_of([6, 6], "right", seed=1).items() if key != "labels"}
    generation_tasks = torch.tensor([1, 2])
    our_ids = ours.generate(**prompt, task_ids=generation_tasks, max_new_tokens=4, **GENERATION)
    their_ids = greedy_by_forward(functools.partial(theirs, task_ids=generation_tasks), **prompt, max_new_tokens=4)
    assert torch.equal(our_ids, their_ids)


def test_parameter_counts_of_real_shapes_equal_pefts(capsys):
    """On the meta device (no weights): bloomz-560m and Llama-3.2-1B, 20 tokens, 2 tasks, rank 1."""
    config = MultitaskPromptTuningConfig(num_virtual_tokens=20, num_tasks=2)
    counts = {}
    for name in ("bigscience/bloomz-560m", "meta-llama/Llama-3.2-1B"):
        base_config = base_model_config(name)
        (ours,) = parameter_counts(base_config, {"multitask": config})
        theirs = get_peft_model(meta_base_model(base_config), peft_config_for(config)).get_nb_trainable_parameters()
        assert (ours.trainable, ours.total) == theirs, name
        counts[name] = ours.trainable
    assert counts["bigscience/bloomz-560m"] == 22_568  # P * C + N * P * r + N * r * C, as PEFT printed it
    assert main(["params", "--method", "multitask-prompt-tuning", "--num-virtual-tokens", "20",
                 "--num-tasks", "2"]) == 0
    assert "trainable params: 22,568 || all params: 559,237,160" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- inits


def test_random_init_is_pefts_for_the_same_seed():
    base = tiny_base("llama")
    torch.manual_seed(5)
    ours = SoftPromptModel(base, copy.deepcopy(CONFIG)).prompts["default"].state_dict()
    torch.manual_seed(5)
    theirs = get_peft_model(copy.deepcopy(base), peft_config_for(CONFIG, base)).prompt_encoder["default"]
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    # PEFT's scale: every prompt starts close to zero (std ~4e-4 * sqrt(r)).
    prompts = SoftPromptModel(base, copy.deepcopy(CONFIG)).prompts["default"](torch.arange(3)).detach()
    assert 1e-4 < float(prompts.std()) < 2e-3


def test_text_init_is_pefts(tiny_bloom, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = MultitaskPromptTuningConfig(num_virtual_tokens=9, num_tasks=2, prompt_tuning_init="TEXT",
                                         prompt_tuning_init_text="Is this a complaint ?")
    torch.manual_seed(0)
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config), tokenizer=tokenizer).prompts["default"]
    their_config = peft.MultitaskPromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=9, num_tasks=2, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Is this a complaint ?", tokenizer_name_or_path=str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(tiny_bloom), their_config).prompt_encoder["default"]
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    ids = tokenizer("Is this a complaint ?")["input_ids"]
    assert len(ids) < 9 and torch.equal(ours.embedding.weight, tiny_bloom.get_input_embeddings().weight[(ids * 9)[:9]])


@pytest.fixture
def source_files(tmp_path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A trained-looking source adapter of 3 tasks and rank 2, saved in both formats."""
    base = tiny_base("llama")
    torch.manual_seed(2)
    source = with_random_weights(SoftPromptModel(base, copy.deepcopy(CONFIG)))
    source.save_pretrained(tmp_path / "peft", format="peft")
    source.save_pretrained(tmp_path / "ours")
    return base, {"peft": tmp_path / "peft" / "adapter_model.safetensors", "ours": tmp_path / "ours"}


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_source_inits_are_pefts(init, source_files):
    base, files = source_files
    target = dict(num_virtual_tokens=3, num_ranks=2, prompt_tuning_init=init, prompt_tuning_init_task=1,
                  prompt_tuning_init_state_dict_path=str(files["peft"]))
    torch.manual_seed(3)
    ours = SoftPromptModel(base, MultitaskPromptTuningConfig(**target)).prompts["default"]
    torch.manual_seed(3)
    theirs = get_peft_model(copy.deepcopy(base), peft.MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                                  **target)).prompt_encoder["default"]
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    source = load_file(files["peft"])
    assert torch.equal(ours.embedding.weight, source["prompt_embeddings"])
    expected = {"AVERAGE_SOURCE_TASKS": source["prefix_task_cols"].mean(0), "EXACT_SOURCE_TASK":
                source["prefix_task_cols"][1], "ONLY_SOURCE_SHARED": None}[init]
    if expected is not None:
        assert torch.equal(ours.prefix_task_cols[0], expected)
    # softprompt's own format, or its directory, starts the same adapter.
    torch.manual_seed(3)
    from_ours = SoftPromptModel(base, MultitaskPromptTuningConfig(
        **{**target, "prompt_tuning_init_state_dict_path": str(files["ours"])})).prompts["default"]
    for name, tensor in ours.state_dict().items():
        assert torch.equal(from_ours.state_dict()[name], tensor), name


def test_a_target_of_several_tasks_starts_every_task_from_the_source(source_files):
    """PEFT loads a source only into a target of one task (a size mismatch otherwise); softprompt starts each."""
    base, files = source_files
    target = dict(num_virtual_tokens=3, num_ranks=2, num_tasks=2, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                  prompt_tuning_init_state_dict_path=str(files["peft"]))
    with pytest.raises(RuntimeError, match="size mismatch"):
        get_peft_model(copy.deepcopy(base), peft.MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM, **target))
    module = SoftPromptModel(base, MultitaskPromptTuningConfig(**target)).prompts["default"]
    average = load_file(files["peft"])["prefix_task_rows"].mean(0)
    assert torch.equal(module.prefix_task_rows[0], average) and torch.equal(module.prefix_task_rows[1], average)


def test_a_source_that_does_not_fit_is_explained_and_pickles_are_never_read(source_files, tmp_path):
    base, files = source_files

    def build(**fields):
        values = dict(num_virtual_tokens=3, num_ranks=2, prompt_tuning_init="EXACT_SOURCE_TASK",
                      prompt_tuning_init_state_dict_path=str(files["peft"]))
        return SoftPromptModel(base, MultitaskPromptTuningConfig(**{**values, **fields}))

    with pytest.raises(ValueError, match=r"its shared prompt is \[3, 32\], this adapter's \[P, C\] = \[4, 32\]\. "
                                         r"Fix: num_virtual_tokens=3"):
        build(num_virtual_tokens=4)
    with pytest.raises(ValueError, match=r"this adapter's rank is 1\. Fix: num_ranks=2"):
        build(num_ranks=1)
    with pytest.raises(ValueError, match=r"prompt_tuning_init_task=3: the source .* has 3 tasks"):
        build(prompt_tuning_init_task=3)
    pickled = tmp_path / "adapter_model.bin"
    pickled.write_bytes(b"not even read")
    with pytest.raises(ValueError, match="expected a .safetensors file; softprompt never unpickles"):
        build(prompt_tuning_init_state_dict_path=str(pickled))
    other = tmp_path / "other.safetensors"
    save_file({"prompt_embeddings": torch.zeros(3, 32)}, str(other))
    with pytest.raises(ValueError, match=r"tensors \['prefix_task_cols', 'prefix_task_rows'\] missing"):
        build(prompt_tuning_init_state_dict_path=str(other))


# ------------------------------------------------------------------------------------------------- task ids


def test_a_call_without_task_ids_or_with_unknown_ones_is_refused(tiny_bloom, batch):
    model = SoftPromptModel(tiny_bloom, MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=2,
                                                                    task_names=["spam", "tweets"]))
    needs = (r"adapter \(2 task\(s\) \(0=spam, 1=tweets\)\) needs each row's task: got task_ids=None\. Fix: "
             r"pass task_ids=torch.tensor")
    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    for call in (lambda: model(**batch), lambda: model.compute_loss(**batch), lambda: model.generate(**prompt),
                 lambda: model.summed_loss(**batch)):
        with pytest.raises(ValueError, match=needs):
            call()
    with pytest.raises(ValueError, match=r"task_ids holds \[2\]: expected task ids in \[0, 2\) for this adapter's 2 "
                                         r"task\(s\) \(0=spam, 1=tweets\)"):
        model(**batch, task_ids=torch.tensor([0, 2, 1]))
    model(**batch, task_ids=torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("fields, message", [
    (dict(num_virtual_tokens=2, num_tasks=0), "num_tasks=0: expected a positive int"),
    (dict(num_virtual_tokens=2, num_ranks=-1), "num_ranks=-1: expected a positive int"),
    (dict(num_virtual_tokens=2, prompt_tuning_init="FOO"), "prompt_tuning_init='FOO': expected one of TEXT, RANDOM"),
    (dict(num_virtual_tokens=2, prompt_tuning_init="EXACT_SOURCE_TASK"),
     "prompt_tuning_init=EXACT_SOURCE_TASK without prompt_tuning_init_state_dict_path"),
    (dict(num_virtual_tokens=2, prompt_tuning_init_state_dict_path="a.safetensors"), "the file would be ignored"),
    (dict(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "expected a non-empty text"),
    (dict(num_virtual_tokens=2, prompt_tuning_init_text="hi"), "only TEXT init starts from a text"),
    (dict(num_virtual_tokens=2, prompt_tuning_init_task=-1), "prompt_tuning_init_task=-1: expected a source task id"),
    (dict(num_virtual_tokens=2, num_tasks=2, task_names=["a"]), "expected 2 distinct non-empty names"),
    (dict(num_virtual_tokens=2, num_tasks=2, task_names=["a", "a"]), "expected 2 distinct non-empty names"),
], ids=lambda value: str(value)[:40])
def test_bad_config_values_name_the_value_and_the_fix(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MultitaskPromptTuningConfig(**fields)


# ------------------------------------------------------------------------------------------------- every family


MIXED_ROWS = [("multitask", 0, 6), ("prompt", 0, 4), ("multitask", 2, 5), (None, 0, 3), ("prefix", 0, 6),
              ("multitask", 2, 2)]
"""(adapter, task, real tokens), left-padded to 6: two tasks of one multitask adapter among other methods."""


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_left_padded_mixed_batch_gives_every_row_what_it_gives_alone(model_type):
    """Logits, loss (both layouts), each adapter's gradient from its own rows only (several adapters trained at
    once), greedy ids; and the method's plain reference (PEFT's layout, the position rule) on the multitask rows."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_weights(SoftPromptModel(base, copy.deepcopy(CONFIG), adapter_name="multitask"), "multitask")
    model.add_adapter("prompt", softprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("prefix", softprompt.PrefixTuningConfig(num_virtual_tokens=2))
    names = [name for name, _, _ in MIXED_ROWS]
    task_ids = torch.tensor([task for _, task, _ in MIXED_ROWS])
    batch = batch_of([n for _, _, n in MIXED_ROWS], "left")
    width = batch["input_ids"].shape[1]
    labels = batch["labels"].clone()
    for row, (_, _, n) in enumerate(MIXED_ROWS):
        labels[row, width - n] = -100  # predicted from padding in the batch, from a virtual token (or nothing) alone

    def alone(row: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[row : row + 1, width - MIXED_ROWS[row][2] :]

    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], adapter_names=names, task_ids=task_ids).logits
        for row, (name, task, n) in enumerate(MIXED_ROWS):
            own = model(alone(row, batch["input_ids"]), labels=alone(row, labels), adapter_names=[name],
                        task_ids=task_ids[row : row + 1])
            torch.testing.assert_close(logits[row, -n:], own.logits[0], **TOLERANCE, msg=f"row {row}")
            only_this_row = torch.full_like(labels, -100)
            only_this_row[row] = labels[row]
            for layout in ("prefix", "sequence"):
                mixed = model.compute_loss(batch["input_ids"], batch["attention_mask"], only_this_row, names,
                                           virtual_token_layout=layout, task_ids=task_ids)
                torch.testing.assert_close(mixed, own.loss, **TOLERANCE, msg=f"row {row} {layout}")
        rows = [row for row, name in enumerate(names) if name == "multitask"]
        reference = multitask_prompt_tuning.reference_forward(
            base, model.prompts["multitask"], batch["input_ids"][rows], batch["attention_mask"][rows],
            task_ids[rows], labels[rows])
        ours = model(batch["input_ids"][rows], batch["attention_mask"][rows], labels[rows],
                     adapter_names=["multitask"] * len(rows), task_ids=task_ids[rows])
        real = batch["attention_mask"][rows].bool()
        torch.testing.assert_close(ours.logits[real], reference.logits[:, 3:][real], **TOLERANCE)
        torch.testing.assert_close(ours.loss, reference.loss, **TOLERANCE)

    make_trainable(model, ["multitask", "prompt", "prefix"])
    errors = gradient_isolation_errors(model, batch["input_ids"], batch["attention_mask"], labels, names, task_ids)
    assert max(errors.values()) < 1e-5, errors

    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    greedy = model.generate(**prompt, adapter_names=names, task_ids=task_ids, max_new_tokens=4, **GENERATION)
    for row, (name, _, n) in enumerate(MIXED_ROWS):
        own = model.generate(input_ids=alone(row, batch["input_ids"]), adapter_names=[name],
                             task_ids=task_ids[row : row + 1], max_new_tokens=4, **GENERATION)
        assert torch.equal(greedy[row, width:], own[0, n:]), f"greedy, row {row} ({name})"


@pytest.mark.parametrize("model_type", ["bloom", "llama"])
def test_gradient_checkpointing_changes_nothing(model_type):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_weights(SoftPromptModel(base, copy.deepcopy(CONFIG)))
    assert_checkpointing_changes_nothing(model, batch_of([6, 4], "left"), task_ids=torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_both_formats_both_ways(model_type, tmp_path):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    config = MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=3, num_ranks=2, task_names=["a", "b", "c"])
    model = with_random_weights(SoftPromptModel(base, config))
    batch, task_ids = batch_of([6, 4, 5], "right"), torch.tensor([2, 0, 1])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch, task_ids=task_ids).logits
        model.save_pretrained(tmp_path / "ours")
        ours = SoftPromptModel.from_pretrained(base, tmp_path / "ours", format="softprompt")
        assert ours.active_config == config  # task names included
        assert torch.equal(ours(**batch, task_ids=task_ids).logits, expected)
        assert "materialized" not in load_file(tmp_path / "ours" / "adapter.safetensors")  # one prompt per task

        model.save_pretrained(tmp_path / "to-peft", format="peft")
        assert set(load_file(tmp_path / "to-peft" / "adapter_model.safetensors")) == {
            "prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
        assert "task_names" not in json.loads((tmp_path / "to-peft" / "adapter_config.json").read_text())
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to-peft").eval()
        torch.testing.assert_close(loaded(**batch, task_ids=task_ids).logits[:, 3:][real], expected[real], **TOLERANCE)

        peft_twin(model, base).save_pretrained(tmp_path / "from-peft")
        imported = SoftPromptModel.from_pretrained(base, tmp_path / "from-peft", format="peft")
        assert torch.equal(imported(**batch, task_ids=task_ids).logits, expected)  # PEFT drops nothing but names


# ------------------------------------------------------------------------------------------------- command line


SHORT = ["--split", "train[:60]", "--num-generations", "0", "--no-progress"]


def evaluations(run: Path) -> list[dict]:
    return [record for record in read_metrics(run / "metrics.jsonl") if record["event"] == "eval"]


def test_the_command_line_trains_it_on_the_default_data(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--method", "multitask-prompt-tuning", *SHORT, "--num-epochs", "3",
                 "--output-dir", str(run)]) == 0
    first, last = evaluations(run)[0], evaluations(run)[-1]
    assert last["loss"] < 0.9 * first["loss"], (first, last)
    recorded = json.loads((run / "adapter" / "adapter_config.json").read_text())["config"]
    assert (recorded["num_tasks"], recorded["task_names"]) == (1, ["default"])


def task_data(path: Path) -> Path:
    """Cats and dogs rows, labelled, in one file with a task column."""
    rows = [{"text": f"my {pet} number {i} {'sleeps' if i % 3 else 'plays'}", "label": "yes" if i % 3 else "no",
             "task": pet} for i in range(20) for pet in ("dogs", "cats")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def task_config(tmp_path: Path, output: str, **overrides) -> TrainConfig:
    values = dict(dataset=[str(task_data(tmp_path / "tasks.jsonl"))], text_column=["text"], label_column="label",
                  task_column="task", method="multitask-prompt-tuning", num_virtual_tokens=3, num_epochs=2,
                  save_every=2, num_generations=2, progress=False, output_dir=str(tmp_path / output))
    return TrainConfig.from_dict({**values, **overrides})


@pytest.fixture(scope="module")
def task_run(tmp_path_factory) -> tuple[Path, object]:
    directory = tmp_path_factory.mktemp("multitask")
    return directory, train(task_config(directory, "run"))


def test_a_task_column_trains_one_adapter_with_a_task_id_per_task(task_run, capsys, monkeypatch):
    """The task ids are the sorted tasks, recorded with the adapter; eval reproduces the run's last evaluation and
    generate maps --task to the same id."""
    directory, result = task_run
    assert list(result.adapter_directories) == ["default"]
    adapter = result.adapter_directories["default"]
    recorded = json.loads((adapter / "adapter_config.json").read_text())["config"]
    assert (recorded["num_tasks"], recorded["task_names"]) == (2, ["cats", "dogs"])
    assert main(["eval", "--adapter", str(adapter), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(result.final_eval["loss"], rel=1e-6)
    assert evaluated["accuracy"] == result.final_eval["accuracy"]
    # Rank classification chooses among every task's labels with the task ids (the same score in eval and train).
    assert evaluated["rank_accuracy"] is not None and evaluated["rank_accuracy"] == result.final_eval["rank_accuracy"]

    prompt = "text : my dogs number 7 sleeps Label : "
    generate = SoftPromptModel.generate
    asked = []

    def spy(self, *args, **options):
        asked.append(options["task_ids"].tolist())
        return generate(self, *args, **options)

    monkeypatch.setattr(SoftPromptModel, "generate", spy)
    for task, expected in (("dogs", 1), ("cats", 0), ("1", 1)):
        assert main(["generate", "--adapter", str(adapter), "--prompt", prompt, "--prompt", "hi", "--task", task,
                     "--max-new-tokens", "2"]) == 0
        assert asked.pop() == [expected, expected]
        assert capsys.readouterr().out.startswith(f"[adapter] {prompt}")
    assert main(["generate", "--adapter", str(adapter), "--prompt", prompt]) == 2
    assert "has 2 tasks (['cats', 'dogs']): expected --task" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--prompt", prompt, "--task", "birds"]) == 2
    assert "task 'birds': this multitask adapter knows the names ['cats', 'dogs'] or the ids 0 to 1" in \
        capsys.readouterr().err


def test_an_interrupted_run_resumes_bit_for_bit(task_run):
    directory, result = task_run
    assert_resumes_bit_for_bit(lambda **resume: task_config(directory, "interrupted", **resume), result, 3)


def test_several_datasets_are_the_tasks_of_one_adapter(tmp_path):
    from softprompt.training.method_data import prepare_run_data

    files = [task_data(tmp_path / "pets.jsonl"), task_data(tmp_path / "animals.jsonl")]
    config = TrainConfig.from_dict(dict(dataset=[str(path) for path in files], text_column=["text"],
                                        label_column="label", method="multitask-prompt-tuning",
                                        output_dir=str(tmp_path / "run")))
    data, adapters = prepare_run_data(config, softprompt.quickstart.build_tokenizer())
    assert list(adapters) == data.adapter_names == ["default"]
    assert (adapters["default"].num_tasks, adapters["default"].task_names) == (2, ["animals", "pets"])
    assert sorted({example["task_id"] for example in data.train}) == [0, 1]
    assert {example["task"] for example in data.train + data.eval + data.eval_prompts} == {"default"}


def test_task_names_given_must_cover_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"The data's tasks \['dogs'\] are not among task_names=\['cats', 'birds'\]"):
        train(task_config(tmp_path, "run", num_tasks=2, task_names=["cats", "birds"]))
    with pytest.raises(ValueError, match=r"num_tasks=3 with the 2 task\(s\) of the data"):
        train(task_config(tmp_path, "run", num_tasks=3))
    assert not (tmp_path / "run").exists()  # refused before anything was written
