"""Every method and variant against PEFT holding the same weights: loss, logits, gradients, greedy generation.

PEFT is the reference our users know. Both libraries run the same frozen tiny BLOOM on the same left-padded batch
of mixed lengths; softprompt's weights are copied into PEFT's prompt encoder (PEFT's state-dict names are ours with
the prefix ``prompt_encoder.default.``).

PEFT 0.21's ``generate`` breaks on transformers 5.24 (it still passes the renamed ``past_key_values``), so the
greedy reference is PEFT's forward run token by token (`greedy_by_forward`), and the references for beams and
sampling come from the base model itself: transformers' ``generate`` on ``inputs_embeds`` that hold PEFT's virtual
tokens, or continuing from a plain ``DynamicCache`` holding PEFT's prefix.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft import TaskType, get_peft_model

import softprompt
from softprompt import SoftPromptModel

from transformers import DynamicCache

from helpers import INIT_TEXT, UNUSED_EMBEDDING_ROWS, VARIANTS, greedy_by_forward, left_padded_batch
from peft_reference import peft_twin
from softprompt.seams import cache_argument

# fp32 on CPU: both libraries run the same kernels in the same order for the frozen model, so differences come
# only from a different summation order in the loss or the cache concatenation, a few ulps of values of order 1-10.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)

@pytest.fixture
def text_peft_config(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return lambda: peft.PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=13,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=str(tmp_path / "tokenizer"),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_logits_gradients_and_generation_equal_peft(variant, tiny_bloom, tokenizer, batch, text_peft_config):
    config, make_peft_config = VARIANTS[variant]
    make_peft_config = make_peft_config or text_peft_config
    torch.manual_seed(0)
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config), tokenizer=tokenizer)
    theirs = peft_twin(ours, tiny_bloom, peft_config=make_peft_config())
    num_virtual = 0 if config.method == "prefix_tuning" else config.num_virtual_tokens

    our_output = ours(**batch)
    their_output = theirs(**batch)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    assert our_output.logits.shape == (*batch["input_ids"].shape, tiny_bloom.config.vocab_size)
    real = batch["attention_mask"].bool()  # padded positions' logits are meaningless in both libraries
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, num_virtual:][real], **TOLERANCE)

    our_output.loss.backward()
    their_output.loss.backward()
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in ours.prompts["default"].named_parameters():
        their_gradient = their_parameters[f"prompt_encoder.default.{name}"].grad
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(parameter.grad, their_gradient, **TOLERANCE, msg=f"gradient of {name}")

    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    # No EOS: every row runs all 10 new tokens.
    our_ids = ours.generate(**prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    their_ids = greedy_by_forward(theirs, **prompt, max_new_tokens=10)
    assert our_ids.shape == (3, batch["input_ids"].shape[1] + 10)
    assert torch.equal(our_ids, their_ids)


@pytest.mark.parametrize("variant", ["prompt-random", "p-tuning-lstm", "prefix-projection"])
def test_right_padding_equals_peft(variant, tiny_bloom, tokenizer):
    config, make_peft_config = VARIANTS[variant]
    torch.manual_seed(0)
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config))
    theirs = peft_twin(ours, tiny_bloom, peft_config=make_peft_config())
    left = left_padded_batch(tokenizer, ["a short one", "a somewhat longer sentence than that"])
    right = {key: torch.stack([row.roll(-int((mask == 0).sum())) for row, mask in zip(value, left["attention_mask"])])
             for key, value in left.items()}  # the same rows, padding moved to the right
    num_virtual = 0 if config.method == "prefix_tuning" else config.num_virtual_tokens
    our_output, their_output = ours(**right), theirs(**right)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    real = right["attention_mask"].bool()
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, num_virtual:][real], **TOLERANCE)
    # Padding side must not change what a real token sees.
    torch.testing.assert_close(our_output.logits[real], ours(**left).logits[left["attention_mask"].bool()], **TOLERANCE)


def base_model_generate(theirs: peft.PeftModel, config, prompt: dict[str, torch.Tensor], **options) -> torch.Tensor:
    """transformers' own ``generate`` on the frozen base with PEFT's prompt: its virtual tokens in front of the
    input embeddings, or its prefix as a plain ``DynamicCache`` (repeated per beam / returned sequence, as
    ``generate`` repeats the input rows). Returns the input ids followed by the new ids, like ``generate``."""
    base = theirs.get_base_model()
    input_ids, attention_mask = prompt["input_ids"], prompt["attention_mask"]
    batch_size, num_virtual = input_ids.shape[0], config.num_virtual_tokens
    mask = torch.cat([torch.ones(batch_size, num_virtual, dtype=attention_mask.dtype), attention_mask], dim=1)
    repeats = max(options.get("num_beams", 1), options.get("num_return_sequences", 1))
    with torch.no_grad():
        if config.method == "prefix_tuning":
            prefix = theirs.get_prompt(batch_size)  # PEFT's own cache of its prefix
            cache = DynamicCache(config=base.config)
            for layer, past in enumerate(prefix.layers):  # keys and values, each [B, H, P, D]
                cache.update(past.keys.repeat_interleave(repeats, 0), past.values.repeat_interleave(repeats, 0), layer)
            return base.generate(input_ids=input_ids, attention_mask=mask, **cache_argument(base, cache), **options)
        virtual = theirs.get_prompt(batch_size)  # [B, P, C]
        embeddings = torch.cat([virtual, base.get_input_embeddings()(input_ids)], dim=1)  # [B, P + T, C]
        new_ids = base.generate(inputs_embeds=embeddings, attention_mask=mask, **options)  # only the new ids
    return torch.cat([input_ids.repeat_interleave(options.get("num_return_sequences", 1), dim=0), new_ids], dim=1)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, top_k=8),
    ],
    ids=["beams", "return-sequences", "sampling"],
)
@pytest.mark.parametrize("variant", ["p-tuning-mlp", "prefix"])
def test_beams_and_sampling_equal_the_base_model_generating_from_pefts_prompt(variant, options, tiny_bloom, batch):
    config, make_peft_config = VARIANTS[variant]
    torch.manual_seed(0)
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config))
    theirs = peft_twin(ours, tiny_bloom, peft_config=make_peft_config())
    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    options = dict(options, max_new_tokens=10, eos_token_id=None, pad_token_id=tiny_bloom.config.pad_token_id)
    torch.manual_seed(1)
    our_ids = ours.generate(**prompt, **options)
    torch.manual_seed(1)
    reference_ids = base_model_generate(theirs, config, prompt, **options)
    assert our_ids.shape == (3 * options.get("num_return_sequences", 1), prompt["input_ids"].shape[1] + 10)
    assert torch.equal(our_ids, reference_ids)
    assert torch.equal(our_ids[:, : prompt["input_ids"].shape[1]], prompt["input_ids"].repeat_interleave(
        options.get("num_return_sequences", 1), dim=0))  # input first, then only new ids


@pytest.mark.parametrize(
    "options",
    [dict(repetition_penalty=1.3), dict(eos_token_id=5)],
    ids=["repetition-penalty", "eos"],
)
@pytest.mark.parametrize("variant", ["p-tuning-mlp", "prefix"])
def test_greedy_options_equal_pefts_forward_token_by_token(variant, options, tiny_bloom, batch):
    config, make_peft_config = VARIANTS[variant]
    torch.manual_seed(0)
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config))
    theirs = peft_twin(ours, tiny_bloom, peft_config=make_peft_config())
    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    options = {"eos_token_id": None, **options, "pad_token_id": tiny_bloom.config.pad_token_id}
    our_ids = ours.generate(**prompt, max_new_tokens=10, do_sample=False, **options)
    their_ids = greedy_by_forward(theirs, **prompt, max_new_tokens=10, **options)
    assert torch.equal(our_ids, their_ids)


def test_text_init_equals_peft_init(tiny_bloom, tokenizer, text_peft_config):
    config = VARIANTS["prompt-text"][0]
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config), tokenizer=tokenizer)
    theirs = get_peft_model(copy.deepcopy(tiny_bloom), text_peft_config())
    table = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.prompts["default"].embedding.weight, table)
    # 13 virtual tokens from a shorter text: the ids repeat whole, then are cut (PEFT's rule).
    ids = tokenizer(INIT_TEXT)["input_ids"]
    assert len(ids) < 13
    expected_ids = (ids * 13)[:13]
    assert torch.equal(table, tiny_bloom.get_input_embeddings().weight[expected_ids])


def test_text_init_truncates_a_long_text(tiny_bloom, tokenizer):
    config = softprompt.PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT
    )
    ours = SoftPromptModel(tiny_bloom, config, tokenizer=tokenizer)
    first_ids = tokenizer(INIT_TEXT)["input_ids"][:3]
    assert torch.equal(ours.prompts["default"].embedding.weight, tiny_bloom.get_input_embeddings().weight[first_ids])


def test_sample_vocab_init_draws_only_ids_the_tokenizer_produces(tiny_bloom, tokenizer):
    """Unlike PEFT, which draws from every row of the embedding matrix, SAMPLE_VOCAB draws uniformly from the ids the
    tokenizer produces: no special id, no row past the tokenizer's vocabulary (never trained in BLOOM)."""
    producible = set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids)
    embeddings = tiny_bloom.get_input_embeddings().weight.detach()  # [V, C], V = len(tokenizer) + unused rows
    assert embeddings.shape[0] == len(tokenizer) + UNUSED_EMBEDDING_ROWS and len(producible) < len(tokenizer)
    row_ids = {row.numpy().tobytes(): index for index, row in enumerate(embeddings)}
    assert len(row_ids) == embeddings.shape[0], "two rows are equal: a drawn row would not name its id"
    # Enough draws that a wrong range shows with certainty: a draw over all V rows misses the 24 unused rows with
    # probability (1 - 24 / 1316) ** 40000 < 1e-300, and a producible id is never drawn with probability
    # 1288 * (1 - 1 / 1288) ** 40000 < 1e-10, so the drawn set must be exactly the producible set. A [40000, 32] table
    # is 5 MB and builds in milliseconds.
    num_draws = 40_000
    torch.manual_seed(0)
    config = softprompt.PromptTuningConfig(num_virtual_tokens=num_draws, prompt_tuning_init="SAMPLE_VOCAB")
    table = SoftPromptModel(tiny_bloom, config, tokenizer=tokenizer).prompts["default"].embedding.weight.detach()
    drawn = [row_ids.get(row.tobytes()) for row in table.numpy()]
    assert None not in drawn, "every virtual token starts as some token's embedding"
    assert set(drawn) == producible
    # Uniform: Pearson's chi-square of the counts (each id ~31 times) has mean k - 1 and sd sqrt(2 (k - 1)) over k
    # ids; 8 sd above the mean is not reached by chance (p < 1e-9), while a skewed draw (say a third of the ids
    # twice as likely) lands thousands above it.
    counts = torch.bincount(torch.tensor(drawn), minlength=embeddings.shape[0])[sorted(producible)].double()
    expected = num_draws / len(producible)
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    dof = len(producible) - 1
    assert chi_square < dof + 8 * (2 * dof) ** 0.5, chi_square
