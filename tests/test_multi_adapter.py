"""Many adapters in one batch: every row computes what it computes alone (issue 5).

One frozen tiny BLOOM carries five adapters: prompt tuning, p-tuning (MLP and LSTM) and prefix tuning (plain and
projected), with four different numbers of virtual tokens. The batch mixes them with rows that use no adapter,
rows of different lengths and left padding. For every row, the mixed batch must give what the row gives alone
(batch of one, no padding): logits, loss, gradients, greedy and beam generation, and for sampled generation the
distribution of every step (the draws themselves share one random stream per batch); and what PEFT gives with
the same weights. The ALiBi test shows why hidden slots are harmless, and that the equality tests could fail.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft import TaskType
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom import modeling_bloom

import softprompt
from softprompt import SoftPromptModel
from helpers import gradient_isolation_errors, greedy_by_forward
from peft_reference import peft_twin
from softprompt.multi_task import (
    adapter_names_for_tasks,
    labelled_positions,
    make_trainable,
    multi_adapter_loss,
)

# fp32 on CPU. A row alone and the same row in the mixed batch run the same operations; only matmul blocking over a
# different batch / key length changes the summation order, a few ulps of values of order 1-10 (measured: <= 2e-7).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# "Clearly different": what a wrong adapter, a shifted position or a leaked row produces is orders of magnitude above
# TOLERANCE, so that every equality below is shown to be able to fail.
DIFFERENT = 1e-3

# AdamW divides each entry's step by that entry's own gradient size, so an entry whose gradient is near rounding level
# (1e-7 of the largest) moves by about the learning rate in a direction known to ~1e-3: after 3 steps of lr 1e-2 two
# exact runs may differ by ~1e-5. 1e-4 is 1/100 of one step; a leaked row changes steps by whole learning rates.
ADAM_TOLERANCE = dict(rtol=1e-5, atol=1e-4)

VOCAB_SIZE = 300
PAD_ID = 3
# No EOS: every row runs all its new tokens, alone and in the batch, so their ids line up one to one.
GENERATION = dict(eos_token_id=None, pad_token_id=PAD_ID)

ADAPTERS = {
    "prompt": softprompt.PromptTuningConfig(num_virtual_tokens=4),
    "p_mlp": softprompt.PromptEncoderConfig(num_virtual_tokens=6, encoder_hidden_size=16),
    "p_lstm": softprompt.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix": softprompt.PrefixTuningConfig(num_virtual_tokens=5),
    "prefix_proj": softprompt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=24),
}
PEFT_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "p_mlp": lambda: peft.PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=16
    ),
    "p_lstm": lambda: peft.PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=3,
        encoder_hidden_size=16,
        encoder_reparameterization_type="LSTM",
    ),
    "prefix": lambda: peft.PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    "prefix_proj": lambda: peft.PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=24
    ),
}
# (adapter, real tokens) per row. T = 12: rows of length 12 have no padding. Each method has an unpadded row and a
# padded one; the prefix rows sit beside virtual-token rows, so they get hidden virtual slots in front of them.
ROWS = [
    ("prompt", 12),
    (None, 12),
    ("p_mlp", 5),
    ("prefix", 12),
    ("p_lstm", 7),
    ("prefix_proj", 3),
    (None, 6),
    ("prefix", 8),
    ("prompt", 9),
]
NAMES = [name for name, _ in ROWS]


@pytest.fixture(scope="module")
def base() -> BloomForCausalLM:
    """A 2-layer BLOOM (C=32, H=4, D=8, V=300), random weights, fp32, eval mode.

    initializer_range=0.3 (BLOOM's is 0.02) spreads the logits, so that greedy continuations vary from token to
    token and from adapter to adapter; with near-uniform logits every row would repeat one token.
    """
    config = BloomConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BloomForCausalLM(config).eval()


def build_model(base: BloomForCausalLM) -> SoftPromptModel:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        names = iter(ADAPTERS)
        first = next(names)
        model = SoftPromptModel(base, copy.deepcopy(ADAPTERS[first]), adapter_name=first)
        for name in names:
            model.add_adapter(name, copy.deepcopy(ADAPTERS[name]))
    return model.eval()


@pytest.fixture
def model(base) -> SoftPromptModel:
    return build_model(base)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """The ROWS, left-padded to T = 12; labels on every real token (the causal-LM recipe's labels)."""
    length = max(n for _, n in ROWS)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.full((len(ROWS), length), PAD_ID)
    attention_mask = torch.zeros(len(ROWS), length, dtype=torch.long)
    for row, (_, n) in enumerate(ROWS):
        input_ids[row, length - n :] = torch.randint(4, VOCAB_SIZE, (n,), generator=generator)
        attention_mask[row, length - n :] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def alone(batch: dict[str, torch.Tensor], row: int, key: str = "input_ids") -> torch.Tensor:
    """Row `row` as a batch of one without its padding, ``[1, n]``."""
    n = ROWS[row][1]
    return batch[key][row : row + 1, -n:]


def labels_scored_alike(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The labels with the first real token of every padded row unlabelled.

    In a left-padded batch the first real token is predicted from the last padding position, in PEFT and
    transformers as here; alone, it is predicted from the last virtual token (or not at all). Every other labelled
    position is predicted from the same position alone and in the batch.
    """
    labels = batch["labels"].clone()
    for row, (_, n) in enumerate(ROWS):
        if n < labels.shape[1]:
            labels[row, -n] = -100
    return labels


def only_rows(labels: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`labels` with every other row unlabelled: the batch's loss is then the mean over these rows only."""
    kept = torch.full_like(labels, -100)
    kept[rows] = labels[rows]
    return kept


def assert_gradients_close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """TOLERANCE relative to the gradient's largest entry: a summed gradient adds many terms, and its rounding
    follows the size of its largest entries (up to ~30 here), not the size of each entry."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=TOLERANCE["rtol"], atol=TOLERANCE["atol"] * scale, msg=msg)


def arange_alibi(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """BLOOM's ALiBi with positions counted by index instead of ``cumsum(attention_mask) - 1``: hidden slots
    would then take up positions."""
    return modeling_bloom.build_alibi_tensor(torch.ones_like(attention_mask), num_heads, dtype)


# ---------------------------------------------------------------------------------------------- forward and loss


def test_each_row_of_a_mixed_batch_has_its_logits_alone(model, batch):
    with torch.no_grad():
        mixed = model(batch["input_ids"], batch["attention_mask"], adapter_names=NAMES).logits  # [B, T, V]
        assert mixed.shape == (len(ROWS), batch["input_ids"].shape[1], VOCAB_SIZE)
        for row, (name, n) in enumerate(ROWS):
            ids = alone(batch, row)
            logits = model(ids, adapter_names=[name]).logits[0]  # [n, V]
            torch.testing.assert_close(mixed[row, -n:], logits, **TOLERANCE, msg=f"row {row} ({name})")
            base_logits = model.base_model(input_ids=ids).logits[0]
            if name is None:
                torch.testing.assert_close(logits, base_logits, **TOLERANCE)
            else:
                assert (logits - base_logits).abs().max() > DIFFERENT, f"adapter {name} changes nothing"


def test_a_batch_without_adapters_is_the_base_model(model, batch):
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(**inputs, adapter_names=[None] * len(ROWS)).logits
        theirs = model.base_model(**inputs).logits
    torch.testing.assert_close(ours[real], theirs[real], **TOLERANCE)
    generated = model.generate(**inputs, adapter_names=[None] * len(ROWS), max_new_tokens=4, **GENERATION)
    assert torch.equal(generated, model.base_model.generate(**inputs, max_new_tokens=4, do_sample=False, **GENERATION))


def test_each_row_of_a_mixed_batch_has_its_loss_alone(model, batch):
    labels = labels_scored_alike(batch)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    counts = labelled_positions(model, labels, NAMES)
    losses_alone = []
    with torch.no_grad():
        for row, (name, n) in enumerate(ROWS):
            loss_alone = model(alone(batch, row), labels=alone({"labels": labels}, row, "labels"), adapter_names=[name])
            losses_alone.append(loss_alone.loss)
            # The batch's loss with only this row labelled is this row's mean loss, computed inside the mixed batch.
            loss_mixed = model(**inputs, labels=only_rows(labels, [row]), adapter_names=NAMES).loss
            torch.testing.assert_close(loss_mixed, loss_alone.loss, **TOLERANCE, msg=f"row {row} ({name})")
        # The whole batch's loss is the mean over all labelled positions: the rows' losses weighted by their counts.
        weighted = (torch.stack(losses_alone) * counts).sum() / counts.sum()
        full = model(**inputs, labels=labels, adapter_names=NAMES).loss
        torch.testing.assert_close(full, weighted, **TOLERANCE)
        # compute_loss (LM head on the labelled rows only) is the same loss.
        for layout in ("prefix", "sequence"):
            torch.testing.assert_close(
                model.compute_loss(**inputs, labels=labels, adapter_names=NAMES, virtual_token_layout=layout), full,
                **TOLERANCE, msg=layout)


def test_first_token_of_a_prefix_or_base_row_is_not_scored_beside_virtual_tokens(model, batch):
    """Alone, nothing precedes the first token of a prefix-tuning or base-model row, so it is never scored. In a
    batch with virtual-token rows, the slot before it is a hidden virtual slot, which must not score it either."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    for row in (1, 3):  # unpadded base-model and prefix rows
        name = ROWS[row][0]
        first_only = torch.full_like(batch["labels"], -100)
        first_only[row, 0] = batch["labels"][row, 0]
        first_and_second = first_only.clone()
        first_and_second[row, 1] = batch["labels"][row, 1]
        with torch.no_grad():
            second_alone = model(
                alone(batch, row), labels=alone({"labels": first_and_second}, row, "labels"), adapter_names=[name]
            ).loss
            mixed = model(**inputs, labels=first_and_second, adapter_names=NAMES).loss
            assert torch.isnan(model(**inputs, labels=first_only, adapter_names=NAMES).loss), "first token scored"
        torch.testing.assert_close(mixed, second_alone, **TOLERANCE)
    assert labelled_positions(model, batch["labels"][:4], NAMES[:4]).tolist() == [12, 11, 5, 11]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_mixed_batch_equals_peft_for_each_adapter(name, model, batch, base):
    """PEFT runs one adapter per call: its rows of the same left-padded batch (full width, labels on every real
    token, the padded rows' first token included) against the same rows inside our mixed batch."""
    rows = [row for row, n in enumerate(NAMES) if n == name]
    twin = peft_twin(model, base, name, peft_config=PEFT_CONFIGS[name]())
    num_virtual = 0 if ADAPTERS[name].method == "prefix_tuning" else ADAPTERS[name].num_virtual_tokens
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    sub = {key: value[rows] for key, value in batch.items()}
    with torch.no_grad():
        ours = model(**inputs, labels=only_rows(batch["labels"], rows), adapter_names=NAMES)
        theirs = twin(**sub)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOLERANCE)
    real = sub["attention_mask"].bool()  # padded positions' logits are meaningless in both libraries
    torch.testing.assert_close(ours.logits[rows][real], theirs.logits[:, num_virtual:][real], **TOLERANCE)

    our_ids = model.generate(**inputs, adapter_names=NAMES, max_new_tokens=10, **GENERATION)
    # PEFT 0.21's generate breaks on transformers 5.24: its forward, run token by token, is the greedy reference.
    their_ids = greedy_by_forward(twin, sub["input_ids"], sub["attention_mask"], max_new_tokens=10)
    assert torch.equal(our_ids[rows], their_ids)


# ------------------------------------------------------------------------------------------------------- ALiBi


def test_alibi_positions_come_from_the_mask_so_hidden_slots_shift_nothing(model, batch, monkeypatch):
    # BLOOM's ALiBi bias of a key is slope * (cumsum(mask) - 1): the visible keys of [1 0 0 1 1] get the positions
    # of [1 1 1].
    alibi = modeling_bloom.build_alibi_tensor(torch.tensor([[1, 0, 0, 1, 1]]), 4, torch.float32)  # [H, 1, 5]
    compact = modeling_bloom.build_alibi_tensor(torch.tensor([[1, 1, 1]]), 4, torch.float32)  # [H, 1, 3]
    assert torch.equal(alibi[..., [0, 3, 4]], compact)

    # Hidden slots in front of and between real tokens leave the real tokens' logits unchanged...
    ids = alone(batch, 0)  # [1, 12]
    hidden = torch.tensor([[7, 8]])
    spread = torch.cat([hidden, ids[:, :5], hidden, hidden, ids[:, 5:]], dim=1)  # [1, 18]
    visible = torch.cat([torch.zeros(1, 2), torch.ones(1, 5), torch.zeros(1, 4), torch.ones(1, 7)], dim=1).long()
    base = model.base_model
    with torch.no_grad():
        reference = base(input_ids=ids).logits[0]
        masked = base(input_ids=spread, attention_mask=visible).logits[0, visible[0].bool()]
        unmasked = base(input_ids=spread).logits[0, visible[0].bool()]
    torch.testing.assert_close(masked, reference, **TOLERANCE)
    # ...but not when the mask does not hide them (so the comparison above can fail),
    assert (unmasked - reference).abs().max() > DIFFERENT
    # ...nor if positions were counted by index: slots the mask hides would still push later keys further away.
    monkeypatch.setattr(base.transformer, "build_alibi_tensor", arange_alibi)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits[0], reference, **TOLERANCE)  # no slot: no change
        by_index = base(input_ids=spread, attention_mask=visible).logits[0, visible[0].bool()]
        assert (by_index - reference).abs().max() > DIFFERENT
        # The mixed batch relies on it: an unpadded prefix row has hidden virtual slots between its prefix and its
        # tokens, and would no longer compute what it computes alone.
        mixed = model(batch["input_ids"], batch["attention_mask"], adapter_names=NAMES).logits
        row_alone = model(alone(batch, 3), adapter_names=[NAMES[3]]).logits[0]
        assert (mixed[3] - row_alone).abs().max() > DIFFERENT


# ------------------------------------------------------------------------------------------------- generation


def test_greedy_generation_of_each_row_equals_the_row_alone(model, batch):
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    generated = model.generate(**inputs, adapter_names=NAMES, max_new_tokens=10, do_sample=False, **GENERATION)
    length = batch["input_ids"].shape[1]
    assert generated.shape == (len(ROWS), length + 10)
    assert torch.equal(generated[:, :length], batch["input_ids"])
    changed = 0
    for row, (name, n) in enumerate(ROWS):
        ids = alone(batch, row)
        row_ids = model.generate(input_ids=ids, adapter_names=[name], max_new_tokens=10, do_sample=False, **GENERATION)
        assert row_ids.shape == (1, n + 10)
        assert torch.equal(generated[row, length:], row_ids[0, n:]), f"row {row} ({name})"
        base_ids = model.base_model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, **GENERATION)
        changed += not torch.equal(row_ids, base_ids)
    assert changed >= 5, "the adapters barely change the continuations: the equality above proves little"


def test_beam_search_with_mixed_adapters(model, batch):
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    length = batch["input_ids"].shape[1]
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, **GENERATION)
    generated = model.generate(**inputs, adapter_names=NAMES, **beams)
    assert generated.shape == (2 * len(ROWS), length + 6)  # row r's sequences are rows 2r and 2r + 1
    for row, (name, n) in enumerate(ROWS):
        row_ids = model.generate(input_ids=alone(batch, row), adapter_names=[name], **beams)
        assert torch.equal(generated[2 * row : 2 * row + 2, length:], row_ids[:, n:]), f"row {row} ({name})"


def test_sampling_draws_each_row_from_its_distribution_alone(model, batch):
    """transformers draws a batch's samples from one random stream (torch.multinomial over the rows), so a row's
    sampled ids in a batch cannot equal the ids it samples alone. What must hold is that every step of every row
    samples from the distribution the row has alone: the raw logits of each step equal those of the row alone,
    fed the same ids (teacher forcing), and every sampled id is among that row's own top-k."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    length, new, top_k, sequences = batch["input_ids"].shape[1], 6, 3, 2
    torch.manual_seed(0)
    output = model.generate(
        **inputs, adapter_names=NAMES, max_new_tokens=new, do_sample=True, top_k=top_k,
        num_return_sequences=sequences, return_dict_in_generate=True, output_logits=True, **GENERATION,
    )
    sampled = output.sequences  # [B * sequences, T + new]: row r's samples are rows 2r and 2r + 1
    step_logits = torch.stack(output.logits, dim=1)  # [B * sequences, new, V]
    assert sampled.shape == (sequences * len(ROWS), length + new)
    not_greedy = outside_base_top_k = 0
    for index in range(sampled.shape[0]):
        row = index // sequences
        name, n = ROWS[row]
        assert torch.equal(sampled[index, :length], batch["input_ids"][row])
        new_ids = sampled[index, length:]
        ids = torch.cat([alone(batch, row)[0], new_ids])[None]  # [1, n + new]
        with torch.no_grad():
            alone_logits = model(ids, adapter_names=[name]).logits[0, n - 1 : -1]  # [new, V]: predict the new ids
            base_logits = model.base_model(input_ids=ids).logits[0, n - 1 : -1]
        # A cached step against a full forward pass: summation order only (measured: <= 4e-6 on logits up to ~7,
        # more than the 2e-7 above, since the cache splits the attention sums; TOLERANCE allows ~8e-5 there).
        torch.testing.assert_close(step_logits[index], alone_logits, **TOLERANCE, msg=f"row {row} ({name})")
        own_top_k = alone_logits.topk(top_k, dim=-1).indices  # [new, k]
        assert (own_top_k == new_ids[:, None]).any(-1).all(), f"row {row} ({name}) sampled outside its top-{top_k}"
        not_greedy += int((new_ids != own_top_k[:, 0]).sum())
        if name is not None:
            outside_base_top_k += int((base_logits.topk(top_k, dim=-1).indices != new_ids[:, None]).all(-1).sum())
    # The checks above can fail: some draws are not the top token (sampling happened), and some are ids the base
    # model without the row's adapter would never sample with this top_k.
    assert not_greedy > 0 and outside_base_top_k > 0, (not_greedy, outside_base_top_k)
    # Sampling from the top token only is greedy.
    top_1 = model.generate(**inputs, adapter_names=NAMES, max_new_tokens=new, do_sample=True, top_k=1, **GENERATION)
    greedy = model.generate(**inputs, adapter_names=NAMES, max_new_tokens=new, do_sample=False, **GENERATION)
    assert torch.equal(top_1, greedy)


# -------------------------------------------------------------------------------------------------- gradients


def test_each_adapters_gradient_comes_only_from_its_rows(model, batch):
    """Summed loss: an adapter's gradient from the mixed batch is the sum of its rows' gradients, each row run
    alone (the mean would scale it by the adapter's share of the batch's labelled positions)."""
    make_trainable(model, ADAPTERS)
    parameters = dict(model.prompts.named_parameters())  # "<adapter>.<parameter>"
    labels = labels_scored_alike(batch)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    mixed_loss = multi_adapter_loss(model, **inputs, labels=labels, adapter_names=NAMES, reduction="sum")
    mixed = dict(zip(parameters, torch.autograd.grad(mixed_loss, list(parameters.values()))))
    for name in ADAPTERS:
        rows = [row for row, n in enumerate(NAMES) if n == name]
        summed = sum(
            model(alone(batch, row), labels=alone({"labels": labels}, row, "labels"), adapter_names=[name]).loss
            * labelled_positions(model, alone({"labels": labels}, row, "labels"), [name])[0]
            for row in rows
        )
        own = [key for key in parameters if key.startswith(f"{name}.")]
        for key, gradient in zip(own, torch.autograd.grad(summed, [parameters[key] for key in own])):
            assert gradient.abs().max() > DIFFERENT, f"{key} gets no gradient"
            assert_gradients_close(mixed[key], gradient, msg=f"gradient of {key}")


def test_gradient_isolation_helper_passes_and_can_fail(model, batch, monkeypatch):
    make_trainable(model, ADAPTERS)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    errors = gradient_isolation_errors(model, **inputs, adapter_names=NAMES)
    assert set(errors) == set(ADAPTERS)
    assert max(errors.values()) < TOLERANCE["rtol"], errors  # relative to each adapter's largest gradient entry
    # With positions counted by index, hidden slots shift the prefix rows: the helper must see it.
    monkeypatch.setattr(model.base_model.transformer, "build_alibi_tensor", arange_alibi)
    errors = gradient_isolation_errors(model, **inputs, adapter_names=NAMES)
    assert errors["prefix"] > DIFFERENT and errors["prefix_proj"] > DIFFERENT, errors


@pytest.mark.parametrize("reduction", ["sum", "adapter_mean"])
def test_training_several_adapters_at_once_equals_training_each_alone(reduction, base, batch):
    """A few AdamW steps on the mixed batch give each adapter the parameters that the same steps on a batch of its
    own rows give, under the same loss reduction ("adapter_mean" alone is the plain mean loss)."""
    labels = labels_scored_alike(batch)
    steps, learning_rate = 3, 1e-2
    mixed = build_model(base)
    optimizer = torch.optim.AdamW(make_trainable(mixed, ADAPTERS), lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        multi_adapter_loss(
            mixed, batch["input_ids"], batch["attention_mask"], labels, NAMES, reduction=reduction
        ).backward()
        optimizer.step()

    separate = build_model(base)
    for name in ADAPTERS:
        rows = [row for row, n in enumerate(NAMES) if n == name]
        optimizer = torch.optim.AdamW(make_trainable(separate, [name]), lr=learning_rate)
        for _ in range(steps):
            optimizer.zero_grad()
            multi_adapter_loss(
                separate,
                batch["input_ids"][rows],
                batch["attention_mask"][rows],
                labels[rows],
                [name] * len(rows),
                reduction=reduction,
            ).backward()
            optimizer.step()

    start = build_model(base).prompts.state_dict()
    for key, value in separate.prompts.state_dict().items():
        torch.testing.assert_close(mixed.prompts.state_dict()[key], value, **ADAM_TOLERANCE, msg=key)
        assert (value - start[key]).abs().max() > learning_rate / 2, f"{key} did not train"


def test_adapter_mean_gives_each_adapter_the_gradient_of_its_own_mean(model, batch):
    parameters = make_trainable(model, ADAPTERS)
    labels = labels_scored_alike(batch)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    loss = multi_adapter_loss(model, **inputs, labels=labels, adapter_names=NAMES)
    # The value is the batch's plain mean loss, for logging.
    torch.testing.assert_close(loss, model.compute_loss(**inputs, labels=labels, adapter_names=NAMES), **TOLERANCE)
    mixed = torch.autograd.grad(loss, parameters)
    own_means = sum(
        model.compute_loss(**inputs, labels=only_rows(labels, [r for r, n in enumerate(NAMES) if n == name]),
                           adapter_names=NAMES)
        for name in ADAPTERS
    )
    for ours, reference in zip(mixed, torch.autograd.grad(own_means, parameters)):
        assert_gradients_close(ours, reference, msg="adapter_mean gradient")


# ------------------------------------------------------------------------------------------------------ errors


def test_unknown_adapter_name_lists_the_loaded_ones(model, batch):
    names = ["prompt", "nope"] + NAMES[2:]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    loaded = str(sorted(ADAPTERS))
    for call in (
        lambda: model(**inputs, adapter_names=names),
        lambda: model.compute_loss(**inputs, labels=batch["labels"], adapter_names=names),
        lambda: model.generate(**inputs, adapter_names=names, max_new_tokens=2),
        lambda: multi_adapter_loss(model, **inputs, labels=batch["labels"], adapter_names=names),
        lambda: make_trainable(model, ["nope"]),
    ):
        with pytest.raises(ValueError, match="nope") as error:
            call()
        assert loaded in str(error.value)


def test_adapter_names_must_give_one_name_per_row(model, batch):
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    for names in (NAMES[:-1], NAMES + [None]):
        with pytest.raises(ValueError, match=f"{len(names)} entries for a batch of {len(ROWS)} rows"):
            model(**inputs, adapter_names=names)
        with pytest.raises(ValueError, match=f"{len(names)} entries for a batch of {len(ROWS)} rows"):
            model.generate(**inputs, adapter_names=names, max_new_tokens=2)
    with pytest.raises(ValueError, match="one name per row"):
        model(inputs["input_ids"][:6], inputs["attention_mask"][:6], adapter_names="prompt")
    with pytest.raises(ValueError, match="one name per row"):
        multi_adapter_loss(model, **inputs, labels=batch["labels"], adapter_names=NAMES[:-1])


def test_tasks_map_to_adapter_names_and_train_together(model):
    tasks = ["quotes", "prompts", "chat", "quotes"]
    mapping = {"quotes": "prompt", "prompts": "prefix", "chat": None}
    assert adapter_names_for_tasks(tasks, mapping) == ["prompt", "prefix", None, "prompt"]
    assert adapter_names_for_tasks(["prompt", "prefix"]) == ["prompt", "prefix"]
    with pytest.raises(ValueError, match=r"\['poems'\] have no adapter.*\['chat', 'prompts', 'quotes'\]"):
        adapter_names_for_tasks(tasks + ["poems"], mapping)
    with pytest.raises(ValueError, match="one task per row"):
        adapter_names_for_tasks("quotes", mapping)

    model.set_adapter("prompt")  # PEFT's rule: one trainable adapter
    parameters = make_trainable(model, adapter_names_for_tasks(tasks, mapping))
    trainable = {name for name, module in model.prompts.items() if all(p.requires_grad for p in module.parameters())}
    frozen = {name for name, module in model.prompts.items() if not any(p.requires_grad for p in module.parameters())}
    assert trainable == {"prompt", "prefix"} and frozen == {"p_mlp", "p_lstm", "prefix_proj"}
    assert not any(p.requires_grad for p in model.base_model.parameters())
    expected = [*model.prompts["prompt"].parameters(), *model.prompts["prefix"].parameters()]
    assert len(parameters) == len(expected) and all(a is b for a, b in zip(parameters, expected))
    ids = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction='median'"):
        multi_adapter_loss(model, ids, None, ids, ["prompt"], reduction="median")
