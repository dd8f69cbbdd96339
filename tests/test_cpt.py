"""CPT: against PEFT with the same weights on every family PEFT runs it on (context labels, decay, projection),
where softprompt differs from PEFT on purpose, each row of a mixed batch against itself alone, the method's plain
reference, the projection after optimizer steps, both formats, checkpointing, and the command line (the context
built from the training data).

Shapes: B batch, T tokens, P context tokens, C embedding width.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file

import softprompt
from softprompt import CPTConfig, SoftPromptModel
from softprompt.cli import build_parser, main, train_config_from_args
from softprompt.data import DataError
from softprompt.methods import cpt
from softprompt.multi_task import make_trainable
from softprompt.params import base_model_config, meta_base_model, parameter_counts
from softprompt.quickstart import build_tiny_model, build_tokenizer
from softprompt.training import TrainConfig, read_metrics, train
from softprompt.training.method_data import prepare_run_data
from softprompt.training.optimizer_step import optimizer_step

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
CONTEXT = dict(cpt_token_ids=[5, 9, 11, 6, 7, 12, 13, 8, 21, 22], cpt_tokens_type_mask=[1, 2, 2, 3, 4, 5, 6, 7, 8, 8])
"""Two examples: template, input, output template, label (types 1-4, then 5-8); labels at positions 4, 8 and 9."""
# Radii of order 1 (0.5 and 0.25 at C = 32): a delta that matters next to the tiny models' embeddings.
CONFIG = CPTConfig(**CONTEXT, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5, opt_projection_epsilon=4.0,
                   opt_projection_format_epsilon=2.0)
PEFT_FAMILIES = [model_type for model_type in FAMILY_MODEL_TYPES if model_type != "opt"]
"""PEFT sizes CPT's tokens by the hidden size, wider than narrow-embedding OPT's embeddings: it fails there."""


def tiny_base(model_type: str) -> torch.nn.Module:
    return build_tiny_model(model_type, VOCAB_SIZE, seed=0)


def batch_of(lengths: list[int], padding: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(lengths, padding, seed, VOCAB_SIZE, PAD_ID)


def with_random_delta(model: SoftPromptModel, name: str = "default") -> SoftPromptModel:
    """A delta far outside its balls: every forward projects it (PEFT's lazy projection), in both libraries."""
    with torch.no_grad():
        model.prompts[name].delta_embedding.weight.normal_()
    return model


# ------------------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("model_type", PEFT_FAMILIES)
def test_equals_peft_on_every_family(model_type):
    """Loss (the context's labels with decay, the input's labels), real-position logits and the delta's gradient on
    a right-padded batch, the training loss in both layouts, greedy ids (PEFT's forward token by token), and PEFT's
    parameter counts for a fresh config (the frozen context copy counted in all parameters)."""
    base = tiny_base(model_type)
    fresh = SoftPromptModel(base, copy.deepcopy(CONFIG))
    trainable, total = fresh.num_parameters()
    assert (trainable, total) == peft_twin(fresh, base).get_nb_trainable_parameters()
    assert trainable == 10 * base.get_input_embeddings().weight.shape[1]
    torch.manual_seed(1)
    ours = with_random_delta(fresh)
    theirs = peft_twin(ours, base)
    batch = batch_of([7, 4, 6], "right")
    our_output, their_output = ours(**batch), theirs(**batch)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, 10:][real], **TOLERANCE)
    for layout in ("prefix", "sequence"):
        torch.testing.assert_close(ours.compute_loss(**batch, virtual_token_layout=layout), their_output.loss,
                                   **TOLERANCE, msg=layout)
    # Each row: its 3 context labels (positions 4, 8, 9) and its real tokens (the first predicted by the context).
    assert ours.labelled_positions(batch["labels"]).tolist() == [3 + 7, 3 + 4, 3 + 6]

    our_output.loss.backward()
    their_output.loss.backward()
    gradient = ours.prompts["default"].delta_embedding.weight.grad
    their_gradient = dict(theirs.named_parameters())["prompt_encoder.default.delta_embedding.weight"].grad
    torch.testing.assert_close(gradient, their_gradient, **TOLERANCE)
    moves = torch.tensor([t % 4 != 0 for t in CONTEXT["cpt_tokens_type_mask"]])
    assert gradient[moves].abs().sum(dim=1).gt(0).all() and gradient[~moves].abs().sum() == 0  # labels frozen

    prompt = {key: value for key, value in batch_of([6, 6], "right", seed=1).items() if key != "labels"}
    our_ids = ours.generate(**prompt, max_new_tokens=4, **GENERATION)
    assert torch.equal(our_ids, greedy_by_forward(theirs, **prompt, max_new_tokens=4))


def test_narrow_embeddings_fail_in_peft_and_run_here():
    """OPT's narrow embeddings (the reason PEFT_FAMILIES leaves OPT out): PEFT's CPT sizes its tables by the hidden
    size and fails; softprompt sizes them by the embedding width (the mixed-batch test checks its rows on OPT)."""
    base = tiny_base("opt")
    model = SoftPromptModel(base, copy.deepcopy(CONFIG))
    batch = batch_of([6, 4], "right")
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        get_peft_model(copy.deepcopy(base), peft_config_for(CONFIG, base))(**batch)


def test_without_decay_every_loss_term_weighs_one_as_in_peft():
    base = tiny_base("llama")
    torch.manual_seed(1)
    ours = with_random_delta(SoftPromptModel(base, CPTConfig(**CONTEXT, opt_projection_epsilon=4.0)))
    theirs = peft_twin(ours, base)
    batch = batch_of([7, 5], "right")
    torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss, **TOLERANCE)
    torch.testing.assert_close(ours.compute_loss(**batch), theirs(**batch).loss, **TOLERANCE)


def test_the_radii_are_pefts():
    """PEFT's numbers at C = 32 with radii 0.2 (input) and 0.1 (format): 0.025, 0.0125, and 1e-10 for labels."""
    base = tiny_base("llama")
    config = CPTConfig(**CONTEXT, opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.1)
    ours = SoftPromptModel(base, config).prompts["default"].radii
    theirs = peft_twin(SoftPromptModel(base, config), base).prompt_encoder["default"].get_epsilon()
    assert torch.equal(ours, theirs)
    assert ours[:5].tolist() == pytest.approx([0.0125, 0.025, 0.025, 0.0125, 1e-10])


def test_parameter_counts_of_bloomz_are_pefts(capsys):
    """bloomz-560m on the meta device, a 10-token context: PEFT's 10,240 trainable, and the frozen context copy
    counted in all parameters (559,214,592 + 2 * 10,240)."""
    ids, types = list(range(100, 110)), [1, 2, 2, 2, 3, 4, 1, 2, 3, 4]
    config = CPTConfig(cpt_token_ids=ids, cpt_tokens_type_mask=types)
    base_config = base_model_config("bigscience/bloomz-560m")
    (ours,) = parameter_counts(base_config, {"cpt": config})
    theirs = get_peft_model(meta_base_model(base_config), peft_config_for(config)).get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == theirs == (10_240, 559_235_072)
    assert main(["params", "--method", "cpt", "--cpt-token-ids", *map(str, ids),
                 "--cpt-tokens-type-mask", *map(str, types)]) == 0
    assert "trainable params: 10,240 || all params: 559,235,072" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- differences


def test_the_default_type_mask_gives_the_inputs_loss_where_pefts_is_nan():
    """PEFT's default types (all 1) make its input type 5, never a label: its loss is a mean over nothing. softprompt
    scores the input by its labels: the plain cross-entropy of the real tokens, the first predicted by the context."""
    base = tiny_base("llama")
    ours = SoftPromptModel(base, CPTConfig(cpt_token_ids=[5, 6, 7]))
    theirs = peft_twin(ours, base)
    batch = batch_of([6, 4], "right")
    their_output = theirs(**batch)
    assert math.isnan(float(their_output.loss.detach()))
    targets = torch.cat([torch.full((2, 3), -100), batch["labels"]], dim=1)[:, 1:]  # position s predicts s + 1
    expected = torch.nn.functional.cross_entropy(their_output.logits[:, :-1].flatten(0, 1), targets.flatten())
    torch.testing.assert_close(ours(**batch).loss, expected, **TOLERANCE)
    torch.testing.assert_close(ours.compute_loss(**batch), expected, **TOLERANCE)


def test_any_adapter_name_works_where_peft_needs_default():
    base = tiny_base("llama")
    torch.manual_seed(1)
    ours = with_random_delta(SoftPromptModel(base, copy.deepcopy(CONFIG), adapter_name="other"), "other")
    batch = batch_of([6, 4], "right")
    named = get_peft_model(copy.deepcopy(base), peft.CPTConfig(task_type=TaskType.CAUSAL_LM, **CONTEXT),
                           adapter_name="other")
    with pytest.raises(KeyError, match="default"):
        named(**batch)
    reference = peft_twin(ours, base, "other")  # the same weights under PEFT's only working name, default
    torch.testing.assert_close(ours(**batch).loss, reference(**batch).loss, **TOLERANCE)


def test_pefts_input_type_mask_is_refused_where_peft_changes_the_callers_tensor():
    base = tiny_base("llama")
    model = SoftPromptModel(base, copy.deepcopy(CONFIG))
    batch = batch_of([6, 4], "right")
    types = torch.full(batch["input_ids"].shape, 4.0)
    peft_twin(model, base)(**batch, input_type_mask=types)
    assert bool((types == 4 + 8).all())  # PEFT added max(cpt_tokens_type_mask) to the caller's tensor
    with pytest.raises(ValueError, match="input_type_mask .*scores the input's tokens by their labels.*Fix: drop"):
        model(**batch, input_type_mask=types)


@pytest.mark.parametrize("fields, message", [
    (dict(cpt_token_ids=[5, 6], cpt_tokens_type_mask=[1]), "have lengths {'cpt_token_ids': 2, 'cpt_tokens_type_m"),
    (dict(cpt_token_ids=[5, -1]), "cpt_token_ids=[5, -1]: expected a non-empty list of ints >= 0"),
    (dict(cpt_token_ids=[]), "cpt_token_ids=[]: expected a non-empty list"),
    (dict(cpt_tokens_type_mask=[1, 2]), "cpt_mask or cpt_tokens_type_mask without cpt_token_ids"),
    (dict(cpt_token_ids=[5, 6], num_virtual_tokens=20), "num_virtual_tokens=20 with 2 context token(s)"),
    (dict(opt_weighted_loss_type="exp"), "opt_weighted_loss_type='exp': expected 'none' or 'decay'"),
    (dict(opt_loss_decay_factor=0), "opt_loss_decay_factor=0: expected a positive finite number"),
    (dict(opt_projection_epsilon=float("nan")), "opt_projection_epsilon=nan: expected a positive finite number"),
], ids=lambda value: str(value)[:40])
def test_bad_config_values_name_the_value_and_the_fix(fields, message):
    with pytest.raises(ValueError) as error:
        CPTConfig(**fields)
    assert message in str(error.value)


def test_out_of_vocabulary_context_ids_are_refused_by_name():
    with pytest.raises(ValueError, match=r"cpt_token_ids holds \[300, 999\]: expected ids in \[0, 300\)"):
        SoftPromptModel(tiny_base("llama"), CPTConfig(cpt_token_ids=[5, 300, 999]))


def test_peft_defaults():
    """PEFT's defaults: a one-token context [0] of type 1, num_virtual_tokens derived."""
    config = CPTConfig()
    assert (config.context_token_ids, config.context_types, config.num_virtual_tokens) == ([0], [1], 1)
    theirs = peft.CPTConfig(task_type=TaskType.CAUSAL_LM)
    assert (theirs.cpt_token_ids, theirs.cpt_tokens_type_mask, theirs.num_virtual_tokens) == ([0], [1], 1)


# ------------------------------------------------------------------------------------------------- the projection


def test_optimizer_steps_keep_every_delta_in_its_ball_and_follow_pefts_trajectory():
    """Three AdamW steps side by side: after each, the training loop's projection puts every delta row inside its
    ball (PEFT's parameter lies outside until its next forward) and label rows never move; the losses and the
    projected deltas stay PEFT's."""
    base = tiny_base("llama")
    config = CPTConfig(**CONTEXT, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    ours = SoftPromptModel(base, config)
    theirs = peft_twin(ours, base).train()
    module, their_module = ours.prompts["default"], theirs.prompt_encoder["default"]
    batch = batch_of([7, 5], "right")
    optimizers = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
                  for model in (ours, theirs)]
    labels = torch.tensor([t % 4 == 0 for t in CONTEXT["cpt_tokens_type_mask"]])
    for step in range(3):
        our_loss, their_loss = ours.compute_loss(**batch), theirs(**batch).loss
        torch.testing.assert_close(our_loss, their_loss, **TOLERANCE, msg=f"step {step}")
        for loss, optimizer in zip((our_loss, their_loss), optimizers):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        cpt.METHOD.after_optimizer_step(module)
        norms = module.delta_embedding.weight.norm(dim=1)
        assert bool((norms <= module.radii * (1 + 1e-6)).all()), (step, norms, module.radii)
        assert module.delta_embedding.weight[labels].abs().sum() == 0  # label rows never moved
        assert bool((their_module.delta_embedding.weight.norm(dim=1) > their_module.get_epsilon()).any())
        torch.testing.assert_close(module.delta_embedding.weight, their_module.get_projection(), **TOLERANCE)
    assert bool((norms[~labels] > 0).all())  # the other rows did move


def test_the_training_step_projects_right_after_the_update():
    """`softprompt.training.optimizer_step`, the loop's step: the deltas are inside their balls as soon as it
    returns, before any forward (a step of 0.5 per coordinate would put them far outside)."""
    model = SoftPromptModel(tiny_base("llama"), copy.deepcopy(CONFIG))
    module = model.prompts["default"]
    parameters = {"default": [parameter for parameter in module.parameters() if parameter.requires_grad]}
    optimizer = torch.optim.AdamW(parameters["default"], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = {**batch_of([6, 4], "right"), "task": ["default", "default"]}
    optimizer_step(model, parameters, optimizer, scheduler, [batch], {}, 0.0, contextlib.nullcontext)
    norms = module.delta_embedding.weight.norm(dim=1)
    movable = torch.tensor([t % 4 != 0 for t in CONTEXT["cpt_tokens_type_mask"]])
    assert bool((norms <= module.radii * (1 + 1e-6)).all())
    assert bool((norms[movable] > 0.9 * module.radii[movable]).all())  # they did move: onto the sphere
    assert norms[~movable].sum() == 0


# ------------------------------------------------------------------------------------------------- every family


MIXED_ROWS = [("cpt", 6), ("prompt", 4), ("cpt", 3), (None, 5), ("multitask", 6), ("prefix", 2)]
"""(adapter, real tokens), left-padded to 6: two CPT rows among every other kind of adapter."""


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_left_padded_mixed_batch_gives_every_row_what_it_gives_alone(model_type):
    """Logits; the summed loss (every CPT row brings its context's labels, so the batch's sum is the sum of the rows
    alone, in both layouts) and each row's labelled positions; each adapter's gradient from its own rows only;
    greedy ids; and the method's plain reference on the CPT rows."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_delta(SoftPromptModel(base, copy.deepcopy(CONFIG), adapter_name="cpt"), "cpt")
    model.add_adapter("prompt", softprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("multitask", softprompt.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=2))
    model.add_adapter("prefix", softprompt.PrefixTuningConfig(num_virtual_tokens=3))
    names = [name for name, _ in MIXED_ROWS]
    task_ids = torch.ones(len(names), dtype=torch.long)  # the multitask row's task
    batch = batch_of([n for _, n in MIXED_ROWS], "left")
    width = batch["input_ids"].shape[1]
    labels = batch["labels"].clone()
    for row, (_, n) in enumerate(MIXED_ROWS):
        labels[row, width - n] = -100  # predicted from padding in the batch, from a virtual token (or nothing) alone

    def alone(row: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[row : row + 1, width - MIXED_ROWS[row][1] :]

    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], adapter_names=names, task_ids=task_ids).logits
        sums = {"prefix": 0.0, "sequence": 0.0}
        for row, (name, n) in enumerate(MIXED_ROWS):
            own = model(alone(row, batch["input_ids"]), adapter_names=[name], task_ids=task_ids[:1])
            torch.testing.assert_close(logits[row, -n:], own.logits[0], **TOLERANCE, msg=f"row {row}")
            for layout in sums:
                sums[layout] += model.compute_loss(alone(row, batch["input_ids"]), None, alone(row, labels), [name],
                                                   reduction="sum", virtual_token_layout=layout, task_ids=task_ids[:1])
        for layout, expected in sums.items():
            mixed = model.compute_loss(batch["input_ids"], batch["attention_mask"], labels, names, reduction="sum",
                                       virtual_token_layout=layout, task_ids=task_ids)
            torch.testing.assert_close(mixed, expected, **TOLERANCE, msg=layout)
        counts = model.labelled_positions(labels, names, task_ids).tolist()
        assert counts == [int(model.labelled_positions(alone(row, labels), [name], task_ids[:1]))
                          for row, (name, _) in enumerate(MIXED_ROWS)]
        assert counts[0] == 3 + 5  # context labels + real tokens after the first
        rows = [row for row, name in enumerate(names) if name == "cpt"]
        reference = cpt.reference_forward(base, model.prompts["cpt"], batch["input_ids"][rows],
                                          batch["attention_mask"][rows], labels[rows])
        ours = model(batch["input_ids"][rows], batch["attention_mask"][rows], labels[rows], ["cpt"] * len(rows))
        real = batch["attention_mask"][rows].bool()
        torch.testing.assert_close(ours.logits[real], reference.logits[:, 10:][real], **TOLERANCE)
        torch.testing.assert_close(ours.loss, reference.loss, **TOLERANCE)

    make_trainable(model, ["cpt", "prompt", "multitask", "prefix"])
    errors = gradient_isolation_errors(model, batch["input_ids"], batch["attention_mask"], labels, names, task_ids)
    assert max(errors.values()) < 1e-5, errors

    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    greedy = model.generate(**prompt, adapter_names=names, task_ids=task_ids, max_new_tokens=4, **GENERATION)
    for row, (name, n) in enumerate(MIXED_ROWS):
        own = model.generate(input_ids=alone(row, batch["input_ids"]), adapter_names=[name], task_ids=task_ids[:1],
                             max_new_tokens=4, **GENERATION)
        assert torch.equal(greedy[row, width:], own[0, n:]), f"greedy, row {row} ({name})"


@pytest.mark.parametrize("model_type", ["bloom", "llama"])
def test_gradient_checkpointing_changes_nothing(model_type):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_delta(SoftPromptModel(base, copy.deepcopy(CONFIG)))
    assert_checkpointing_changes_nothing(model, batch_of([6, 4], "left"))


# ------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("model_type", PEFT_FAMILIES)
def test_both_formats_both_ways(model_type, tmp_path):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_delta(SoftPromptModel(base, copy.deepcopy(CONFIG)))
    batch = batch_of([6, 4], "right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch).logits
        model.save_pretrained(tmp_path / "ours")
        ours = SoftPromptModel.from_pretrained(base, tmp_path / "ours", format="softprompt", is_trainable=True)
        assert ours.active_config == model.active_config
        for name, tensor in model.prompts["default"].state_dict().items():  # the frozen context and the delta
            assert torch.equal(ours.prompts["default"].state_dict()[name], tensor), name
        assert ours.num_parameters() == model.num_parameters()  # the context copy stays frozen when trainable
        assert torch.equal(ours(**batch).logits, expected)

        model.save_pretrained(tmp_path / "to-peft", format="peft")
        stored = load_file(tmp_path / "to-peft" / "adapter_model.safetensors")
        module = model.prompts["default"]
        assert torch.equal(stored["prompt_embeddings"], module.embedding.weight + module.delta_embedding.weight)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to-peft").eval()
        torch.testing.assert_close(loaded(**batch).logits[:, 10:][real], expected[real], **TOLERANCE)

        peft_twin(model, base).save_pretrained(tmp_path / "from-peft")
        imported = SoftPromptModel.from_pretrained(base, tmp_path / "from-peft", format="peft")
        assert torch.equal(imported.prompts["default"].delta_embedding.weight, torch.zeros(10, 32))  # PEFT's sum
        torch.testing.assert_close(imported(**batch).logits[real], expected[real], **TOLERANCE)


# ------------------------------------------------------------------------------------------------- command line


SHORT = dict(split="train[:60]", num_generations=0, progress=False, num_epochs=2, save_every=3)


def short_config(directory: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({"method": "cpt", **SHORT, "output_dir": str(directory / "run"), **overrides})


def test_the_context_is_built_from_training_examples_in_the_recipes_layout():
    tokenizer = build_tokenizer()
    config = short_config(Path("unused"), context_examples=3)
    everything = prepare_run_data(TrainConfig.from_dict({**SHORT, "output_dir": "unused"}), tokenizer)[0]
    data, adapters = prepare_run_data(config, tokenizer)
    context = adapters["default"]
    ids, types = context.cpt_token_ids, context.cpt_tokens_type_mask
    # Three examples: each its recipe's ids (prompt, label, EOS), types 4k+1..4k+4, the label part scored.
    left = [example for example in everything.train if example not in data.train]
    assert len(left) == 3 and data.eval == everything.eval  # from the training rows only
    assert ids == [token for example in left for token in example["input_ids"]]
    labelled = [token for example in left for token, label in zip(example["input_ids"], example["labels"])
                if label != -100]
    assert [token for token, t in zip(ids, types) if t % 4 == 0] == labelled
    assert sorted(set(types)) == list(range(1, 13))
    words = {t: tokenizer.decode([token for token, s in zip(ids, types) if s == t]) for t in (1, 3)}
    assert words == {1: "Tweet text :", 3: " Label : "}
    assert len({tuple(label for label in example["labels"] if label != -100) for example in left[:2]}) == 2  # by label
    assert context.num_virtual_tokens == len(ids) and context.cpt_mask == [1] * len(ids)


def test_several_datasets_each_get_a_context_of_their_own(tmp_path):
    files = {}
    for name, column, word in (("pets", "pet", "purrs"), ("cars", "car", "honks")):
        rows = [{column: f"the {name} number {i} {word}", "label": "yes" if i % 2 else "no"} for i in range(12)]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig.from_dict(dict(dataset=[str(files["pets"]), str(files["cars"])], text_column=["pet", "car"],
                                        label_column="label", method="cpt", context_examples=2,
                                        output_dir=str(tmp_path / "run")))
    tokenizer = build_tokenizer()
    data, adapters = prepare_run_data(config, tokenizer)
    for name, column, word in (("pets", "pet", "purrs"), ("cars", "car", "honks")):
        context = adapters[name]
        text = tokenizer.decode(context.cpt_token_ids)
        assert text.count(f"{column} :") == 2 and word in text and text.count("Label :") == 2, text
        head = [token for token, t in zip(context.cpt_token_ids, context.cpt_tokens_type_mask) if t == 1]
        assert tokenizer.decode(head) == f"{column} :"  # each dataset's own text column heads its examples
    assert len([example for example in data.train if example["task"] == "pets"]) == 12 - 2 - 2  # 2 held out


def test_a_context_of_ones_own_comes_from_flags_or_a_config_file(tmp_path):
    args = build_parser().parse_args(["train", "--method", "cpt", "--cpt-token-ids", "5", "6", "7",
                                      "--cpt-tokens-type-mask", "1", "2", "4"])
    config = train_config_from_args(args)
    assert (config.adapter.cpt_token_ids, config.adapter.cpt_tokens_type_mask) == ([5, 6, 7], [1, 2, 4])
    path = tmp_path / "run.yaml"
    path.write_text("method: cpt\nadapter: {cpt_token_ids: [5, 6, 7], cpt_tokens_type_mask: [1, 2, 4]}\n")
    assert train_config_from_args(build_parser().parse_args(["train", "--config", str(path)])).adapter == config.adapter
    data, adapters = prepare_run_data(config, build_tokenizer())
    assert adapters["default"] is config.adapter  # used as given; every training row stays
    assert len(data.train) == len(prepare_run_data(TrainConfig(), build_tokenizer())[0].train)
    assert main(["train", "--method", "cpt", "--num-virtual-tokens", "8"]) == 2


def test_causal_lm_data_needs_a_context_of_ones_own(tmp_path):
    from softprompt.quickstart import shipped_dataset_path

    config = short_config(tmp_path, dataset=[str(shipped_dataset_path("quotes"))], text_column=["quote"])
    with pytest.raises(DataError, match="CPT's context is labelled examples, and the data has no label column"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory) -> tuple[Path, object]:
    directory = tmp_path_factory.mktemp("cpt")
    return directory, train(short_config(directory))


def evaluations(run: Path) -> list[dict]:
    return [record for record in read_metrics(run / "metrics.jsonl") if record["event"] == "eval"]


def test_the_command_line_trains_it_on_the_default_data(cpt_run, capsys):
    """The loss falls, the saved deltas lie inside their balls with label rows untouched, and eval reproduces the
    run's last evaluation."""
    directory, result = cpt_run
    first, last = evaluations(directory / "run")[0], evaluations(directory / "run")[-1]
    assert last["loss"] < first["loss"], (first, last)
    adapter = result.adapter_directories["default"]
    config = json.loads((adapter / "adapter_config.json").read_text())["config"]
    tensors = load_file(adapter / "adapter.safetensors")
    types = torch.tensor(config["cpt_tokens_type_mask"])
    delta = tensors["prompt.delta_embedding.weight"]  # [P, C]
    radii = cpt.ball_radii(CPTConfig(**config), delta.shape[1])
    norms = delta.norm(dim=1)
    assert bool((norms <= radii * (1 + 1e-6)).all()) and bool((norms[types % 4 != 0] > 0).all())
    assert norms[types % 4 == 0].sum() == 0
    assert main(["eval", "--adapter", str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result.final_eval["loss"], rel=1e-6)


def test_an_interrupted_run_resumes_bit_for_bit(cpt_run):
    """The context is built from the data again, the same; the training resumes where it stopped."""
    directory, result = cpt_run
    assert_resumes_bit_for_bit(lambda **resume: short_config(directory, output_dir=str(directory / "interrupted"),
                                                             **resume), result, 4)
