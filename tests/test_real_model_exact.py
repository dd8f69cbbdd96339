"""softprompt against its references on a real pretrained model, where random tiny models could hide something:
SmolLM2-135M-Instruct (scripts/real_model.py; 30 Llama layers, 9 query heads sharing 3 key/value heads, rotary
positions, tied embeddings, its own tokenizer and chat template), loaded from the prepared transformers directory.

- Every registered method's first AdamW steps equal PEFT's in float64, on a right-padded batch of real SMS rows
  (PEFT's positions are each row's own there): the losses, every adapter tensor (frozen ones included), CPT's
  projection after each step.
- A prompt of real token embeddings (the chat template's system turn) is the base model reading those tokens:
  logits, and greedy answers to chat-formatted questions.
- TEXT init from the real tokenizer equals PEFT's.
- A left-padded batch of prompt tuning, p-tuning and prefix tuning adapters and the base alone gives each row
  what it gives alone.

Time: about 100 s of one core in all, most of it the float64 steps of both libraries (about a second each;
CPT's, with its 39 context tokens in every row, the longest).
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import TaskType, get_peft_model

import softprompt
from softprompt import (
    AdaptionPromptConfig,
    CartridgeConfig,
    CPTConfig,
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SoftPromptModel,
)
from softprompt.data import collate
from softprompt.families import family_of
from softprompt.methods import METHODS, method_of
from softprompt.positions import position_inputs
from softprompt.recipes import classification_eval_examples, classification_examples
from softprompt.training import load_base_model
from softprompt.training.method_data import cpt_context
from softprompt.training.prepared import PreparedData

from helpers import RealModelFiles
from peft_reference import peft_twin

SMS_ROWS = Path(softprompt.__file__).parent / "data" / "sms_spam.csv"
"""Real labelled messages (softprompt/data/ATTRIBUTION.md)."""
STEPS = 3
"""AdamW steps compared: each feeds the next, so a difference in one step's gradient shows in the later losses."""
SYSTEM = "You are a concise assistant. Answer in a few words."
QUESTIONS = ["What is the capital of France?", "Which planet is known as the red planet?"]


@pytest.fixture(scope="module")
def smollm(real_model_files: RealModelFiles):
    """The float32 model and its tokenizer, shared by the tests of this module (never changed by them)."""
    return load_base_model(str(real_model_files.transformers_directory))


@pytest.fixture(scope="module")
def smollm64(real_model_files: RealModelFiles):
    """The same weights in float64 (about 1 GB)."""
    return load_base_model(str(real_model_files.transformers_directory), dtype=torch.float64)


def sms_rows(count: int, max_characters: int = 70) -> list[dict[str, str]]:
    """The first `count` short rows of the shipped SMS data, ham and spam alternating."""
    with SMS_ROWS.open(newline="", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if len(row["text"]) <= max_characters]
    ham = [row for row in rows if row["label"] == "ham"]
    spam = [row for row in rows if row["label"] == "spam"]
    return [row for pair in zip(ham, spam) for row in pair][:count]


def peft_loss_in_float64(logits: torch.Tensor, labels: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """PEFT's training loss computed in its logits' own float64: transformers' causal-LM loss (shifted by one, -100
    ignored, the mean over labelled positions), with PEFT's `num_virtual` ignored labels in front.

    transformers' loss function casts the logits to float32 first (``ForCausalLMLoss``), so PEFT's own ``.loss``
    carries float32 rounding (measured: up to 3.5e-5 on losses of 2 to 17) and so does its gradient; AdamW turns
    that into different updates for entries whose gradient is that small, and p-tuning's trajectory then leaves
    PEFT's within 4 steps (measured: 1.5e-2 at step 4). Taking the same loss in float64 compares the libraries."""
    labels = F.pad(labels, (num_virtual, 0), value=-100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def cpt_context_config(tokenizer: Any) -> CPTConfig:
    """CPT with the context `softprompt train` builds from training rows (`cpt_context`): a short ham and spam SMS
    after the batch's (39 tokens), each typed template / input / output template / label (types 1-4, then 5-8), so
    that every radius and the decay over two examples take part."""
    rows = classification_examples(sms_rows(7, max_characters=50)[4:], tokenizer, text_column="text",
                                   label_column="label", max_length=48)
    data = PreparedData(kind="classification", adapter_names=["default"], eval=[], eval_prompts=[],
                        train=[{**row, "task": "default"} for row in rows])
    context, _ = cpt_context(data, "default", "text", 2, tokenizer)
    return CPTConfig(**context, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)


def cpt_projection(theirs: Any) -> None:
    """PEFT's own projection of CPT's delta into its balls, the line its forward starts with (it has no step hook):
    applied here right after the step, so that both libraries' parameters are compared where each keeps them."""
    encoder = theirs.prompt_encoder["default"]
    encoder.delta_embedding.weight.data = encoder.get_projection()


def random_gates(module: torch.nn.Module) -> None:
    """Adaption prompt's gates start at 0 in both libraries, where the adapter's tokens get no gradient and every
    mistake but the gate's own is hidden: N(0, 1) instead."""
    with torch.no_grad():
        module.adaption_gate.normal_()


@dataclass(frozen=True)
class StepCase:
    """One method's case of the float64 steps against PEFT."""

    config: Callable[[Any], Any]
    """``config(tokenizer)``: the adapter (a few virtual tokens: each step is two float64 passes of 30 layers)."""
    call: dict[str, Any] = field(default_factory=dict)
    """What both libraries take in every call besides the batch (multitask prompt tuning's per-row task ids)."""
    start: Callable[[torch.nn.Module], None] | None = None
    """Moves our module's fresh weights (PEFT's twin copies them) off an init that hides mistakes."""
    peft_loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    """PEFT's float64 loss from its output and the labels; None: `peft_loss_in_float64` with PEFT's virtual tokens
    (the positions its logits have beyond the input's)."""
    peft_after_step: Callable[[Any], None] | None = None
    """PEFT's counterpart of the method's `MethodSpec.after_optimizer_step`, run on its model after each step."""
    layout: str = "auto"
    """Our training loss's virtual-token layout: ``auto`` (the training path: by cost, ``sequence`` for 4 virtual
    tokens and 4 rows) or another where that one cannot be compared in float64 (CPT)."""


STEP_CASES: dict[str, StepCase] = {
    "prompt_tuning": StepCase(lambda tokenizer: PromptTuningConfig(num_virtual_tokens=4)),
    "p_tuning": StepCase(lambda tokenizer: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32)),
    "prefix_tuning": StepCase(lambda tokenizer: PrefixTuningConfig(num_virtual_tokens=4)),
    "adaption_prompt": StepCase(lambda tokenizer: AdaptionPromptConfig(adapter_len=4, adapter_layers=2),
                                start=random_gates),
    # Three tasks, rows of two of them: a task mixed up sends its rows' gradient to another task's matrices.
    "multitask_prompt_tuning": StepCase(
        lambda tokenizer: MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=3),
        call={"task_ids": torch.tensor([2, 0, 2, 0])}),
    # PEFT computes CPT's loss itself (the context's labels with their decay, then the input's), in its logits'
    # float64: its weights are float32, exact for powers of 0.5. The 39 context tokens make `auto` take the prefix
    # route (the context run once, as keys and values): the same loss (to 1e-15), but gradients equal to PEFT's only
    # within float32 rounding (measured 1.1e-7 on gradients up to 0.48; 6e-8 on 0.25 for prompt tuning's prefix
    # route). Neither library's doing: transformers' LlamaRMSNorm computes in float32 even in a float64 model, and
    # the prefix route adds up the context's gradient in another order before those casts (with the norm in
    # float64, both routes agree to 5e-16 on a tiny Llama). AdamW makes that 7.6e-7 on deltas of 2.2e-3 and 9e-8 on
    # the losses within 3 steps, so PEFT's own layout is compared here; test_cpt.py compares both with PEFT.
    "cpt": StepCase(cpt_context_config, peft_loss=lambda output, labels: output.loss,
                    peft_after_step=cpt_projection, layout="sequence"),
    # The first position (the chat template's <|im_start|>, the attention sink) frozen, as PEFT's default.
    "cartridge": StepCase(
        lambda tokenizer: CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=1, init_text=SYSTEM)),
}
"""Every registered method's case (`test_every_method_has_a_step_case`)."""


def test_every_method_has_a_step_case():
    assert set(STEP_CASES) == set(METHODS), "a method without its float64 steps against PEFT: add it to STEP_CASES"


def peft_tensor(theirs: Any, name: str) -> torch.Tensor:
    """PEFT's tensor for our parameter `name`: ``prompt_encoder.default.<name>`` for a prompt-learning method;
    adaption prompt's per-layer ``[1, ...]`` ones (``<attention path>.<name>``) stacked in layer order, as
    softprompt keeps them."""
    parameters = dict(theirs.named_parameters())
    if f"prompt_encoder.default.{name}" in parameters:
        return parameters[f"prompt_encoder.default.{name}"]
    return torch.cat([parameter for key, parameter in parameters.items() if key.endswith(f".{name}")])


@pytest.mark.parametrize("method", list(METHODS))
def test_the_first_training_steps_follow_pefts_in_float64(method, smollm64):
    base, tokenizer = smollm64
    case, spec = STEP_CASES[method], METHODS[method]
    examples = classification_examples(sms_rows(4), tokenizer, text_column="text", label_column="label",
                                       max_length=48)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id, padding_side="right")
    assert len({len(example["input_ids"]) for example in examples}) > 1  # the padding is real
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    config = case.config(tokenizer)
    assert method_of(config) is spec
    assert (case.peft_after_step is None) == (spec.after_optimizer_step is None)  # a step hook has PEFT's twin
    torch.manual_seed(0)
    ours = SoftPromptModel(base, config, tokenizer=tokenizer).double().train()
    module = ours.prompts["default"]
    if case.start is not None:
        case.start(module)
    theirs = peft_twin(ours, base).train()  # a copy of the base: PEFT keeps it
    our_tensors = dict(module.named_parameters())
    their_tensors = {name: peft_tensor(theirs, name) for name in our_tensors}
    assert all(tensor.dtype == torch.float64 for tensor in [*our_tensors.values(), *their_tensors.values()])
    frozen = {name: tensor.detach().clone() for name, tensor in our_tensors.items() if not tensor.requires_grad}
    assert {name for name, tensor in their_tensors.items() if not tensor.requires_grad} == set(frozen)
    our_trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    their_trainable = [parameter for parameter in theirs.parameters() if parameter.requires_grad]
    assert sum(map(torch.numel, our_trainable)) == sum(map(torch.numel, their_trainable))
    our_optimizer = torch.optim.AdamW(our_trainable, lr=3e-2)  # the loop's defaults
    their_optimizer = torch.optim.AdamW(their_trainable, lr=3e-2)
    losses = []
    for step in range(STEPS):
        # The training path: label-only head, the layout auto chooses (see StepCase.layout).
        our_loss = ours.compute_loss(**inputs, **case.call, virtual_token_layout=case.layout)
        output = theirs(**inputs, **case.call)
        if case.peft_loss is not None:
            their_loss = case.peft_loss(output, inputs["labels"])
        else:
            num_virtual = output.logits.shape[1] - inputs["labels"].shape[1]
            their_loss = peft_loss_in_float64(output.logits, inputs["labels"], num_virtual)
        assert our_loss.dtype == their_loss.dtype == torch.float64
        # Both float64 through the same 30 layers: measured within 1.1e-14 over these 3 steps of every method, on
        # losses of 2.8 to 17. 1e-10 leaves that margin, while one token at another position or a missing virtual
        # token moves the loss by more than 1e-3.
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-10, atol=0, msg=f"{method}, step {step}")
        # PEFT's own loss is float32 (see peft_loss_in_float64; CPT's is the float64 one compared above): within
        # its rounding of logits of order 30.
        losses.append(float(our_loss.detach()))
        assert float(output.loss.detach()) == pytest.approx(losses[-1], abs=1e-4)
        for optimizer, loss in ((our_optimizer, our_loss), (their_optimizer, their_loss)):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if spec.after_optimizer_step is not None:
            spec.after_optimizer_step(module)
            case.peft_after_step(theirs)
        for name, tensor in our_tensors.items():
            # Measured bit-equal after 3 steps, but for a float64 ulp or three of summation order on values of
            # order 4 (multitask prompt tuning's W and adaption prompt's tokens: 6.7e-16); 1e-12 allows for that.
            torch.testing.assert_close(tensor, peft_tensor(theirs, name), rtol=0, atol=1e-12,
                                       msg=f"{method}, {name} after step {step}")
    for name, start in frozen.items():  # e.g. the cartridge's attention sink, CPT's context embeddings
        assert torch.equal(our_tensors[name], start) and torch.equal(peft_tensor(theirs, name), start), name
    assert losses[-1] < losses[0], losses  # the steps did something to compare


def left_padded(tokenizer, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    return collate([{"input_ids": ids} for ids in sequences], pad_token_id=tokenizer.pad_token_id)


def base_logits(base, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model's logits with the position rule's positions (counted over each row's real tokens, as
    transformers' generate counts them)."""
    mask = batch["attention_mask"]
    positions = position_inputs(family_of(base.config), mask, mask.shape[1])
    return base(input_ids=batch["input_ids"], attention_mask=mask, **positions).logits


def test_a_prompt_of_the_system_turns_embeddings_is_the_base_model_reading_it(smollm):
    """The chat template's system turn as a soft prompt of its own token embeddings: the model given only the user
    turns computes what the base computes on whole chats, and answers the same."""
    base, tokenizer = smollm
    chats = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    whole = [tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats]
    turn_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    split = whole[0].index(turn_start, 1)  # the user turn begins at the second <|im_start|>
    system_ids = whole[0][:split]
    assert all(ids[:split] == system_ids for ids in whole) and len({len(ids) for ids in whole}) > 1
    model = SoftPromptModel(base, PromptTuningConfig(num_virtual_tokens=len(system_ids)))
    with torch.no_grad():
        model.prompts["default"].embedding.weight.copy_(base.get_input_embeddings()(torch.tensor(system_ids)))
    users, chats_batch = left_padded(tokenizer, [ids[split:] for ids in whole]), left_padded(tokenizer, whole)
    with torch.no_grad():
        ours = model(users["input_ids"], users["attention_mask"]).logits
        expected = base_logits(base, chats_batch)[:, -users["input_ids"].shape[1]:]
    real = users["attention_mask"].bool()
    # The same numbers in another slot order ([virtual | padding | user] against [padding | system | user]): the
    # attention sums run in another order, measured within 2e-5 on logits of order 20.
    torch.testing.assert_close(ours[real], expected[real], rtol=0, atol=1e-4)

    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = model.generate(**users, **options)[:, users["input_ids"].shape[1]:]
    with torch.no_grad():
        reference = base.generate(**chats_batch, **options)[:, chats_batch["input_ids"].shape[1]:]
    assert torch.equal(answers, reference)
    decoded = tokenizer.batch_decode(answers, skip_special_tokens=True)
    assert "Paris" in decoded[0] and "Mars" in decoded[1], decoded


@pytest.mark.parametrize("text", ["Classify whether this text message is spam or not:", "Spam?"])
def test_text_init_from_the_real_tokenizer_equals_pefts(smollm, real_model_files, text):
    """One text longer than the 8 virtual tokens (cut), one shorter (repeated)."""
    base, tokenizer = smollm
    ids = tokenizer(text)["input_ids"]
    assert (len(ids) > 8) == (text != "Spam?")
    ours = SoftPromptModel(base, PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                    prompt_tuning_init_text=text), tokenizer=tokenizer)
    config = peft.PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=text,
                                     tokenizer_name_or_path=str(real_model_files.transformers_directory))
    theirs = get_peft_model(copy.deepcopy(base), config)
    our_table = ours.prompts["default"].embedding.weight
    assert torch.equal(our_table, theirs.prompt_encoder["default"].embedding.weight)
    assert torch.equal(our_table[0], base.get_input_embeddings().weight[ids[0]])  # real rows, not a fresh draw


def test_a_left_padded_batch_of_mixed_adapters_gives_each_row_what_it_gives_alone(smollm):
    base, tokenizer = smollm
    torch.manual_seed(0)
    model = SoftPromptModel(base, PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                     prompt_tuning_init_text="Is this text message spam?"),
                            tokenizer=tokenizer, adapter_name="prompt")
    model.add_adapter("encoder", PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=64))
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=3))
    model.eval()
    names = ["prompt", "prefix", None, "encoder"]
    prompts = classification_eval_examples(sms_rows(4, max_characters=120), tokenizer, text_column="text",
                                           label_column="label", max_length=48)
    rows = [prompt["input_ids"] for prompt in prompts]
    assert len({len(ids) for ids in rows}) == len(rows)  # four lengths: every row but one is padded
    batch = left_padded(tokenizer, rows)
    options = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], adapter_names=names).logits
    generated = model.generate(**batch, adapter_names=names, **options)[:, batch["input_ids"].shape[1]:]
    for row, (name, ids) in enumerate(zip(names, rows)):
        alone = torch.tensor([ids])
        with torch.no_grad():
            own = model(alone, adapter_names=[name]).logits[0]
        # fp32, the row's real slots in another position of the batch: measured within 2e-5 on logits of order 20.
        torch.testing.assert_close(logits[row, -len(ids):], own, rtol=0, atol=1e-4, msg=f"row {row} ({name})")
        own_ids = model.generate(input_ids=alone, adapter_names=[name], **options)[0, len(ids):]
        assert torch.equal(generated[row], own_ids), f"row {row} ({name})"
