"""Exact identities that need no reference library, and prefix tuning under gradient checkpointing.

- A prompt set to the embeddings of real tokens is those tokens: logits equal the base model's on the
  concatenated ids.
- A prefix set to the base model's own keys and values of a text is that text: logits equal the base model
  continuing it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from softprompt import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SoftPromptModel,
    enable_activation_checkpointing,
)
from softprompt.methods.prefix_tuning import merge_key_values
from softprompt.seams import cache_argument

from helpers import base_state_fingerprint, count_attention_calls


def context_and_batch(tokenizer, batch):
    context_ids = torch.tensor(tokenizer("Answer briefly and politely :")["input_ids"])  # [P]
    return context_ids, batch["input_ids"], batch["attention_mask"]


def base_on_concatenation(base, context_ids, input_ids, attention_mask):
    """The base model on cat(context, input) for every row: logits of the input positions, [B, T, V]."""
    batch_size, num_context = input_ids.shape[0], context_ids.shape[0]
    ids = torch.cat([context_ids.expand(batch_size, -1), input_ids], dim=1)
    mask = torch.cat([torch.ones(batch_size, num_context, dtype=attention_mask.dtype), attention_mask], dim=1)
    return base(input_ids=ids, attention_mask=mask).logits[:, num_context:]


def test_prompt_of_real_token_embeddings_equals_base_model_on_those_tokens(tiny_bloom, tokenizer, batch):
    context_ids, input_ids, attention_mask = context_and_batch(tokenizer, batch)
    model = SoftPromptModel(tiny_bloom, PromptTuningConfig(num_virtual_tokens=len(context_ids)))
    with torch.no_grad():
        model.prompts["default"].embedding.weight.copy_(tiny_bloom.get_input_embeddings()(context_ids))
        expected = base_on_concatenation(tiny_bloom, context_ids, input_ids, attention_mask)
        actual = model(input_ids, attention_mask).logits
    real = attention_mask.bool()
    # The same numbers go through the same kernels in the same order: exactly equal.
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=0)


def test_prefix_of_the_base_models_own_cache_equals_base_model_continuing(tiny_bloom, tokenizer, batch):
    context_ids, input_ids, attention_mask = context_and_batch(tokenizer, batch)
    cache = DynamicCache(config=tiny_bloom.config)
    with torch.no_grad():
        tiny_bloom(input_ids=context_ids[None], use_cache=True, **cache_argument(tiny_bloom, cache))
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, P, D]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    model = SoftPromptModel(tiny_bloom, PrefixTuningConfig(num_virtual_tokens=len(context_ids)))
    with torch.no_grad():
        model.prompts["default"].embedding.weight.copy_(merge_key_values(keys, values))
        expected = base_on_concatenation(tiny_bloom, context_ids, input_ids, attention_mask)
        actual = model(input_ids, attention_mask).logits
    real = attention_mask.bool()
    # The context's keys/values were computed in a separate pass (other matmul shapes): a few fp32 ulps.
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-6, atol=1e-6)


def test_generation_from_real_token_prompt_equals_base_model_generation(tiny_bloom, tokenizer, batch):
    context_ids, input_ids, attention_mask = context_and_batch(tokenizer, batch)
    model = SoftPromptModel(tiny_bloom, PromptTuningConfig(num_virtual_tokens=len(context_ids)))
    with torch.no_grad():
        model.prompts["default"].embedding.weight.copy_(tiny_bloom.get_input_embeddings()(context_ids))
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8)
    batch_size, num_context = input_ids.shape[0], len(context_ids)
    expected = tiny_bloom.generate(
        input_ids=torch.cat([context_ids.expand(batch_size, -1), input_ids], dim=1),
        attention_mask=torch.cat([torch.ones(batch_size, num_context, dtype=torch.long), attention_mask], dim=1),
        max_new_tokens=8,
        do_sample=False,
    )
    assert torch.equal(generated, expected[:, num_context:])


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("path", ["forward", "compute_loss"])
def test_prefix_tuning_with_gradient_checkpointing_equals_without(tiny_bloom, batch, projection, path):
    torch.manual_seed(0)
    model = SoftPromptModel(tiny_bloom, PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection))
    model.train()
    calls = count_attention_calls(model)

    def loss_and_gradients():
        model.zero_grad()
        if path == "forward":
            loss = model(**batch).loss
        else:
            loss = model.compute_loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      virtual_token_layout="prefix")
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.prompts.named_parameters()}

    plain_loss, plain_gradients = loss_and_gradients()
    assert calls == [1, 1]
    enable_activation_checkpointing(tiny_bloom)  # transformers 5 default: non-reentrant
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    assert calls == [3, 3], "each layer ran again in the backward pass: checkpointing was active"
    # Recomputation repeats the same operations on the same inputs: bit-identical.
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=0)
    for name, gradient in plain_gradients.items():
        assert gradient.abs().sum() > 0
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=0, atol=0, msg=name)


def test_checkpointing_switch_is_restored_after_the_forward_pass(tiny_bloom, batch):
    model = SoftPromptModel(tiny_bloom, PrefixTuningConfig(num_virtual_tokens=4))
    enable_activation_checkpointing(tiny_bloom)
    model.train()
    model(**batch).loss.backward()
    assert all(not block._can_checkpoint_with_cache for block in tiny_bloom.get_decoder().h)


@pytest.mark.parametrize(
    "config",
    [PromptTuningConfig(num_virtual_tokens=3), PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8),
     PrefixTuningConfig(num_virtual_tokens=3)],
    ids=["prompt", "p-tuning", "prefix"],
)
def test_optimizer_steps_change_only_the_prompt(tiny_bloom, batch, config):
    torch.manual_seed(0)
    model = SoftPromptModel(tiny_bloom, config)
    fingerprint = base_state_fingerprint(model)
    before = {name: p.detach().clone() for name, p in model.prompts.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model.compute_loss(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        optimizer.step()
    assert base_state_fingerprint(model) == fingerprint
    assert all(not p.requires_grad for p in tiny_bloom.parameters())
    assert all(not torch.equal(before[name], p) for name, p in model.prompts.named_parameters())


def test_drops_into_transformers_trainer(tiny_bloom, tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    texts = ["hello there general kenobi", "a b c d e f g", "another one here now"] * 4

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(texts)

        def __getitem__(self, index):
            ids = torch.tensor(tokenizer(texts[index])["input_ids"][:4])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    model = SoftPromptModel(tiny_bloom, PrefixTuningConfig(num_virtual_tokens=4))
    before = model.prompts["default"].embedding.weight.detach().clone()
    fingerprint = base_state_fingerprint(model)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_strategy="no", report_to=[],
        learning_rate=1e-2, use_cpu=True, disable_tqdm=True,
    )
    result = Trainer(model=model, args=arguments, train_dataset=Rows()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.prompts["default"].embedding.weight, before)
    assert base_state_fingerprint(model) == fingerprint


def test_cpu_generation_head_equals_the_base_head_and_is_put_back(tiny_bloom, batch):
    """generate() on CPU computes the head as (W @ h.T).T (a faster BLAS form) and restores the original head."""
    from softprompt.generation import HeadWithWeightOnTheLeft

    head = tiny_bloom.get_output_embeddings()
    hidden = torch.randn(3, 5, tiny_bloom.config.hidden_size)
    # The same dot products summed in another order by BLAS: fp32 rounding only. Blocks of 100 vocabulary rows leave
    # a ragged last block; the logits come back contiguous, as transformers' decoding wants them.
    assert head.weight.shape[0] % 100 != 0
    for block_rows in (100, 4096):
        logits = HeadWithWeightOnTheLeft(head, block_rows=block_rows)(hidden)
        assert logits.is_contiguous() and logits.shape == (3, 5, head.weight.shape[0])
        torch.testing.assert_close(logits, head(hidden), rtol=1e-5, atol=1e-6)
    model = SoftPromptModel(tiny_bloom, PromptTuningConfig(num_virtual_tokens=3))
    model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    assert tiny_bloom.get_output_embeddings() is head
    with pytest.raises(ValueError):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=-1)
    assert tiny_bloom.get_output_embeddings() is head
