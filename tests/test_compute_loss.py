"""`SoftPromptModel.compute_loss` (the fast training loss) against `forward(...).loss` (full logits).

compute_loss takes three shortcuts: the LM head only at labelled positions, virtual tokens computed once per adapter
and fed as a key/value prefix, and padding columns dropped. Each must leave the loss and every trainable gradient
as the full-logits path computes them, for every method, on left-padded batches of mixed lengths, with mixed
adapters, under gradient checkpointing, and with the Triton kernel (on a GPU when there is one, else under Triton's
CPU interpreter); the same for the "sequence" virtual-token layout, the one-pass CPU head and compiled decoder
passes. No timing is checked here: speed lives in ``benchmarks/``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import softprompt
from softprompt import SoftPromptModel, enable_activation_checkpointing
from softprompt.training_loss import without_padding_columns
from softprompt.quickstart import build_tiny_bloom

from helpers import count_attention_calls

VOCAB_SIZE = 300
PAD_ID = 3

# fp32 throughout. The shortcuts change only the order of sums: the label-only head and the full head compute each
# logit with the same dot product, and the prefix pass computes the virtual tokens' keys and values as a batch of 1
# instead of inside the batch, which changes BLAS blocking (a few ulps of activations of order 1). Losses are ~6
# (log 300), gradients of order 1e-3..1, so 1e-5 relative plus a 1e-6 floor is ~100 ulps of slack: real
# mistakes (a wrong position, a missing row, a lost gradient) show up at 1e-2 or more.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# The Triton kernel walks the vocabulary in blocks with an online log-sum-exp (another summation order again).
TRITON_TOLERANCE = dict(rtol=1e-4, atol=1e-5)

METHODS = {
    "prompt-tuning": softprompt.PromptTuningConfig(num_virtual_tokens=5),
    "p-tuning-mlp": softprompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "p-tuning-lstm": softprompt.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
    ),
    "prefix": softprompt.PrefixTuningConfig(num_virtual_tokens=5),
    "prefix-projection": softprompt.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
}


def _triton_usable() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        importlib.util.find_spec("softprompt.kernels.fused_linear_cross_entropy") is not None
    )


IMPLEMENTATIONS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not _triton_usable(), reason="triton (or the kernel module) not installed")
    ),
]


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    """A 2-layer BLOOM (V=300, C=32, H=4) with random weights."""
    return build_tiny_bloom(VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4, seed=0)


def _batch(lengths: list[int], num_tokens: int, labels: str, seed: int = 0, side: str = "left") -> dict:
    """A padded batch of random ids with rows of the given lengths.

    Args:
        labels: ``"all"`` (every real token, the causal-LM recipe, so ``labels[:, 0]`` counts on a full row) or
            ``"last2"`` (the last two tokens of each row, the classification recipe).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB_SIZE, (len(lengths), num_tokens), generator=generator)
    attention_mask = torch.zeros(len(lengths), num_tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "left":
            attention_mask[row, num_tokens - length :] = 1
        else:
            attention_mask[row, :length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    label_ids = input_ids.masked_fill(attention_mask == 0, -100)
    if labels == "last2":
        label_ids = torch.full_like(input_ids, -100)
        for row, length in enumerate(lengths):
            end = num_tokens if side == "left" else length
            label_ids[row, end - 2 : end] = input_ids[row, end - 2 : end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def _loss_and_grads(model: SoftPromptModel, batch: dict, implementation: str, **kwargs) -> tuple[torch.Tensor, dict]:
    # The prefix layout unless a test asks for another: "auto" picks the sequence layout for these tiny models
    # (`choose_layout`), and the sequence layout has tests of its own.
    kwargs.setdefault("virtual_token_layout", "prefix")
    model.zero_grad(set_to_none=True)
    loss = model.compute_loss(**batch, implementation=implementation, **kwargs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(model: SoftPromptModel, batch: dict, implementation: str, **kwargs) -> None:
    tolerance = TRITON_TOLERANCE if implementation == "triton" else TOLERANCE
    if implementation == "triton" and torch.cuda.is_available():
        # With a GPU the kernel runs compiled, on CUDA tensors (conftest enables the CPU interpreter only without
        # one). torch leaves TF32 off for fp32 matmuls by default, so the reference stays plain fp32 as on CPU.
        model.to("cuda")
        batch = {key: value.to("cuda") for key, value in batch.items()}
    try:
        expected_loss, expected_grads = _loss_and_grads(model, batch, "full", **kwargs)
        loss, grads = _loss_and_grads(model, batch, implementation, **kwargs)
    finally:
        model.to("cpu")  # the base model is shared by this module's tests
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert expected_grads[name].abs().max() > 0, f"{name}: the reference gradient is zero, the test proves nothing"
        torch.testing.assert_close(grads[name], expected_grads[name], **tolerance, msg=name)


def _record_head_choice(monkeypatch, force_plain: bool) -> list[bool]:
    """Records which head the "torch" loss takes on each call (True: the one-pass `HeadAsAttentionCrossEntropy`,
    False: plain [N, V] logits); with `force_plain`, makes it take the plain one."""
    one_pass_applies = softprompt.loss._one_pass_head_applies
    choices = []

    def choose(rows, head_weight):
        choices.append(False if force_plain else one_pass_applies(rows, head_weight))
        return choices[-1]

    monkeypatch.setattr(softprompt.loss, "_one_pass_head_applies", choose)
    return choices


@pytest.mark.parametrize("implementation", ["torch", "torch-plain-head", *IMPLEMENTATIONS[1:]])
@pytest.mark.parametrize("labels", ["all", "last2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_compute_loss_equals_full_logits_loss(base_model, method, labels, implementation, monkeypatch):
    # "torch" on CPU with fp32 rows and a frozen head (every case here) always takes the one-pass head; its plain
    # [N, V]-logits branch (GPUs, half precision, a trainable head) is forced in "torch-plain-head" so that it runs
    # here too.
    choices = _record_head_choice(monkeypatch, force_plain=implementation == "torch-plain-head")
    torch.manual_seed(1)
    model = SoftPromptModel(base_model, METHODS[method])
    # Left-padded, mixed lengths; the full-length row puts a label on column 0, which the last virtual token
    # predicts (prompt tuning, p-tuning).
    batch = _batch([9, 4, 6, 1], num_tokens=9, labels=labels)
    _assert_same(model, batch, "torch" if implementation == "torch-plain-head" else implementation)
    if implementation != "triton":
        assert choices and all(choice == (implementation == "torch") for choice in choices), choices


@pytest.mark.parametrize("labels", ["all", "last2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_sequence_layout_equals_full_logits_loss(base_model, method, labels):
    """virtual_token_layout="sequence": virtual tokens in front of every row, one decoder pass, label-only head."""
    torch.manual_seed(1)
    model = SoftPromptModel(base_model, METHODS[method])
    batch = _batch([9, 4, 6, 1], num_tokens=9, labels=labels)
    _assert_same(model, batch, "torch", virtual_token_layout="sequence")


def test_unknown_virtual_token_layout_is_an_error(base_model):
    model = SoftPromptModel(base_model, METHODS["prompt-tuning"])
    batch = _batch([3, 2], num_tokens=3, labels="all")
    with pytest.raises(ValueError, match="virtual_token_layout='rows': expected 'prefix' or 'sequence'"):
        model.compute_loss(**batch, virtual_token_layout="rows")


def test_unknown_implementation_is_refused_before_any_work(base_model, monkeypatch):
    model = SoftPromptModel(base_model, METHODS["prompt-tuning"])
    batch = _batch([3, 2], num_tokens=3, labels="all")
    decoder_calls = []
    monkeypatch.setattr(model.frozen, "decoder_pass", lambda *args: decoder_calls.append(args))
    with pytest.raises(ValueError, match="implementation='cuda': expected 'torch', 'triton' or 'full'"):
        model.compute_loss(**batch, implementation="cuda")
    assert decoder_calls == []


@pytest.mark.parametrize("key", ["inputs_embeds", "past_key_values", "position_ids"])
def test_forward_refuses_model_inputs_it_would_drop(base_model, key):
    model = SoftPromptModel(base_model, METHODS["prefix"])
    batch = _batch([3, 2], num_tokens=3, labels="all")
    with pytest.raises(ValueError, match=rf"forward got {key}: it builds the embeddings"):
        model(**batch, **{key: None})
    model(**batch, num_items_in_batch=4)  # what trainers pass: still accepted and ignored


@pytest.mark.parametrize("layout", ["prefix", "sequence"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mixed_adapters_in_one_batch(base_model, implementation, layout):
    torch.manual_seed(2)
    model = SoftPromptModel(base_model, METHODS["prompt-tuning"], adapter_name="prompt")
    model.add_adapter("p-tuning", METHODS["p-tuning-mlp"])
    model.add_adapter("prefix", METHODS["prefix"])
    model.add_adapter("short-prompt", softprompt.PromptTuningConfig(num_virtual_tokens=2))
    for module in model.prompts.values():
        module.requires_grad_(True)
    batch = _batch([7, 7, 3, 5, 7, 2], num_tokens=7, labels="all", seed=3)
    names = ["prompt", "prefix", "p-tuning", None, "short-prompt", "prompt"]
    _assert_same(model, batch, implementation, adapter_names=names, virtual_token_layout=layout)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix"])
def test_padding_columns_are_dropped_without_changing_the_loss(base_model, method):
    torch.manual_seed(3)
    model = SoftPromptModel(base_model, METHODS[method])
    # Padded to 12 columns, longest row 6: the seed recipes pad to a fixed max_length.
    left = _batch([6, 3, 5], num_tokens=12, labels="last2", seed=4)
    right = _batch([6, 3, 5], num_tokens=12, labels="all", seed=5, side="right")
    for batch in (left, right):
        trimmed = without_padding_columns(batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert trimmed[0].shape[1] < 12
        _assert_same(model, batch, "torch")


def test_padding_column_that_predicts_a_label_is_kept():
    # Column 0 is padding everywhere, but it predicts labels[:, 1], which is scored: it must stay.
    input_ids = torch.tensor([[PAD_ID, 5, 6], [PAD_ID, PAD_ID, 7]])
    attention_mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    labels = torch.tensor([[-100, 5, 6], [-100, -100, 7]])
    kept = without_padding_columns(input_ids, attention_mask, labels)
    assert kept[0].shape[1] == 3
    labels[0, 1] = -100
    assert without_padding_columns(input_ids, attention_mask, labels)[0].shape[1] == 2


def _columns_that_may_go(attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """The reference for `without_padding_columns`, column by column from its rule: the longest run of leading
    columns hidden in every row whose predicted labels (``labels[:, 1..k]``) are all -100, and the longest run of
    trailing columns hidden in every row whose own labels are all -100 (nothing goes from an all-hidden batch)."""
    num_tokens = labels.shape[1]
    hidden = ~attention_mask.bool().any(dim=0)  # [T]
    unscored = (labels == -100).all(dim=0)  # [T]
    if bool(hidden.all()):
        return 0, num_tokens
    start = 0
    while start < num_tokens and hidden[start] and (start + 1 == num_tokens or unscored[start + 1]):
        start += 1
    stop = num_tokens
    while stop > start and hidden[stop - 1] and unscored[stop - 1]:
        stop -= 1
    return start, stop


def test_padding_columns_follow_the_rule_on_random_batches():
    # Random masks and labels, sparse enough that all-hidden, unlabelled and edge columns all occur.
    generator = torch.Generator().manual_seed(11)
    for _ in range(300):
        batch_size, num_tokens = torch.randint(1, 4, (2,), generator=generator).tolist()
        num_tokens += 3
        attention_mask = (torch.rand(batch_size, num_tokens, generator=generator) < 0.3).long()
        labels = torch.where(torch.rand(batch_size, num_tokens, generator=generator) < 0.2, 5, -100)
        input_ids = torch.arange(batch_size * num_tokens).reshape(batch_size, num_tokens)
        start, stop = _columns_that_may_go(attention_mask, labels)
        kept_ids, kept_mask, kept_labels = without_padding_columns(input_ids, attention_mask, labels)
        assert torch.equal(kept_ids, input_ids[:, start:stop]), (attention_mask, labels)
        assert torch.equal(kept_mask, attention_mask[:, start:stop])
        assert torch.equal(kept_labels, labels[:, start:stop])


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix"])
def test_gradient_checkpointing_keeps_the_loss_and_gradients(method):
    torch.manual_seed(4)
    base = build_tiny_bloom(VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4, seed=0)
    model = SoftPromptModel(base, METHODS[method])
    calls = count_attention_calls(model)
    batch = _batch([8, 5, 3], num_tokens=8, labels="all", seed=6)
    expected_loss, expected_grads = _loss_and_grads(model, batch, "full")
    calls[:] = [0] * len(calls)
    _loss_and_grads(model, batch, "torch")
    plain_calls = list(calls)  # 1 per layer and decoder pass (prompt tuning: a virtual-token pass, then the batch)
    # transformers' default checkpointing (whichever reentrancy it picks) and training mode, as a trainer runs it.
    enable_activation_checkpointing(base)
    base.train()
    calls[:] = [0] * len(calls)
    loss, grads = _loss_and_grads(model, batch, "torch")
    # Checkpointing was active: every layer ran once more, the batch pass recomputed in the backward pass (the short
    # virtual-token pass is not checkpointed: it must fill the cache).
    assert calls == [count + 1 for count in plain_calls], (plain_calls, calls)
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert expected_grads[name].abs().max() > 0, f"{name}: the reference gradient is zero, the test proves nothing"
        torch.testing.assert_close(grads[name], expected_grads[name], **TOLERANCE, msg=name)


def test_a_batch_without_labels_is_refused_by_the_mean_loss_and_nan_in_forward(base_model):
    # forward keeps transformers' convention (a mean over no position is NaN); compute_loss's mean says why instead
    # of returning NaN; the summed loss of a training step is 0 over 0 positions (the step skips and counts it).
    model = SoftPromptModel(base_model, METHODS["prompt-tuning"])
    batch = _batch([4, 2], num_tokens=4, labels="all")
    batch["labels"].fill_(-100)
    assert torch.isnan(model(**batch).loss)
    for implementation in ("full", "torch"):
        with pytest.raises(ValueError, match=r"labels hold no labelled position .* Fix: label at least one token"):
            model.compute_loss(**batch, implementation=implementation)
    total, counts = model.summed_loss(**batch)
    assert float(total) == 0.0 and counts.tolist() == [0, 0]


def test_frozen_base_gets_no_gradient(base_model):
    model = SoftPromptModel(base_model, METHODS["p-tuning-mlp"])
    model.compute_loss(**_batch([5, 3], num_tokens=5, labels="all")).backward()
    assert all(p.grad is None for p in model.base_model.parameters())


@pytest.mark.parametrize("num_rows, channels, vocab", [(1, 8, 13), (7, 32, 300), (24, 64, 1031)])
def test_head_as_attention_equals_cross_entropy(num_rows, channels, vocab):
    """The one-pass CPU head (flash attention with keys = values = the head) against F.cross_entropy."""
    from softprompt.loss import HeadAsAttentionCrossEntropy

    generator = torch.Generator().manual_seed(num_rows)
    rows = torch.randn(num_rows, channels, generator=generator, requires_grad=True)
    head = torch.randn(vocab, channels, generator=generator)
    targets = torch.randint(0, vocab, (num_rows,), generator=generator)
    loss = HeadAsAttentionCrossEntropy.apply(rows, targets, head)  # [N] row losses
    scale = 1.0 + torch.arange(num_rows) % 3  # a grad_output of 1 to 3, other for each row, must scale its gradient
    (gradient,) = torch.autograd.grad((scale * loss).mean(), rows)  # a mean, as in training: gradients of order 1
    expected = torch.nn.functional.cross_entropy(rows @ head.T, targets, reduction="none")
    (expected_gradient,) = torch.autograd.grad((scale * expected).mean(), rows)
    # The kernel sums the softmax block by block (online rescaling): fp32 rounding of a few ulps of the log-sum-exp.
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    torch.testing.assert_close(gradient, expected_gradient, **TOLERANCE)


def test_compiled_decoder_passes_give_the_same_loss_and_gradients(base_model):
    """compile_decoder (torch.compile of both decoder passes) changes how the step runs, not what it computes."""
    torch.manual_seed(1)
    model = SoftPromptModel(base_model, METHODS["p-tuning-mlp"])  # both passes (prefix layout): virtual tokens, then
    batch = _batch([9, 4, 6, 1], num_tokens=9, labels="last2")  # the batch
    expected_loss, expected_grads = _loss_and_grads(model, batch, "torch")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_decoder(dynamic=False)
    try:
        loss, grads = _loss_and_grads(model, batch, "torch")
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # compiled code is cached per process: leave none behind for other tests
    assert compiled_graphs >= 2, "the two decoder passes were not compiled"
    # Inductor fuses and reorders elementwise work (LayerNorm, GeLU, softmax): fp32 rounding differences only.
    torch.testing.assert_close(loss, expected_loss, **TRITON_TOLERANCE)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], **TRITON_TOLERANCE, msg=name)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_head_split_into_vocabulary_slices_merges_exactly(num_splits):
    """The CPU head cuts the vocabulary into slices (one per thread), including a left-over slice (1031 % 3)."""
    from softprompt.loss import _softmax_weighted_head_rows

    generator = torch.Generator().manual_seed(num_splits)
    rows = torch.randn(5, 16, generator=generator)
    head = torch.randn(1031, 16, generator=generator)
    expected_row, lse = _softmax_weighted_head_rows(rows, head, num_splits)
    logits = rows @ head.T  # [N, V]
    # Logits of order 4 (C = 16): a few fp32 ulps of the log-sum-exp and of the softmax weights.
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1), **TOLERANCE)
    torch.testing.assert_close(expected_row, torch.softmax(logits, dim=1) @ head, **TOLERANCE)


# float64 keeps float64: ~1e-16 relative rounding per operation, a few hundred operations deep here, so 1e-12
# relative is tight enough to fail at float32's ~1e-7 and loose enough for the summation-order differences between
# the label-only head, the virtual-token prefix pass and the full-logits reference.
FLOAT64_TOLERANCE = dict(rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning-mlp", "prefix"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bloom"])
def test_a_float64_model_keeps_float64_in_every_loss_path(method, model_type):
    from softprompt.methods import prefix_tuning, prompt_tuning
    from softprompt.quickstart import build_tiny_model

    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0).double()
    model = SoftPromptModel(base, METHODS[method]).double()  # the adapter too, so gradients are float64 end to end
    batch = _batch([7, 4, 6], 7, labels="last2", side="right")
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    trainable = [p for p in model.parameters() if p.requires_grad]

    # The method's plain reference forward, and a float64 cross-entropy of its own float64 logits.
    reference = prefix_tuning if method == "prefix" else prompt_tuning
    logits = reference.reference_forward(base, model.prompts["default"](), batch["input_ids"],
                                         batch["attention_mask"]).logits  # [B, P + T, V] or [B, T, V]
    assert logits.dtype == torch.float64
    shift = logits.shape[1] - batch["labels"].shape[1]
    targets = torch.nn.functional.pad(batch["labels"], (shift, 1), value=-100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected_gradients = torch.autograd.grad(expected, trainable)
    for name, compute in (
        ("compute_loss", lambda: model.compute_loss(*inputs)),
        ("compute_loss sequence layout", lambda: model.compute_loss(*inputs, virtual_token_layout="sequence")),
        ("forward", lambda: model(*inputs).loss),
    ):
        loss = compute()
        assert loss.dtype == torch.float64, name
        torch.testing.assert_close(loss, expected, **FLOAT64_TOLERANCE, msg=lambda m: f"{name}: {m}")
        # Gradients where the base's own layers stay float64: Llama's RMSNorm and BLOOM's eager softmax compute in
        # float32 inside transformers, so their gradients agree only to ~1e-7 between two graphs (the prefix route
        # sums the rows' gradients before those layers, the reference after); GPT-2's layers are float64 throughout.
        if model_type == "gpt2" or name != "compute_loss":
            for gradient, wanted in zip(torch.autograd.grad(loss, trainable), expected_gradients):
                torch.testing.assert_close(gradient, wanted, **FLOAT64_TOLERANCE, msg=lambda m: f"{name} grad: {m}")


def test_float64_would_fail_at_float32_precision():
    # The tolerance above can tell the two apart: the same loss computed through float32 logits is ~1e-7 off.
    base = build_tiny_bloom(VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4, seed=0).double()
    model = SoftPromptModel(base, softprompt.PrefixTuningConfig(num_virtual_tokens=5))
    batch = _batch([7, 4, 6], 7, labels="last2", side="right")
    full = model(batch["input_ids"], batch["attention_mask"])
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].flatten()
    logits = full.logits.flatten(0, 1)
    exact = torch.nn.functional.cross_entropy(logits, targets)
    narrowed = torch.nn.functional.cross_entropy(logits.float(), targets).double()
    assert not torch.allclose(narrowed, exact, **FLOAT64_TOLERANCE)
    torch.testing.assert_close(model.compute_loss(batch["input_ids"], batch["attention_mask"], batch["labels"]),
                               exact, **FLOAT64_TOLERANCE)


def test_the_auto_layout_chooses_by_what_each_layout_saves(base_model):
    from softprompt.training_loss import choose_layout

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # benchmarks/train_step.py's launch-bound shape (24 layers of BLOOM at C 64, ~50k parameters each), 16 rows and 8
    # virtual tokens: the prefix layout saves 15 x 8 positions per layer, far less than its extra launches cost.
    assert choose_layout(16, 8, 49_920, cpu) == "sequence"
    # bloomz-560m's layers (12.6M parameters each), 8 rows: on CPU the positions saved outweigh the launches...
    assert choose_layout(8, 8, 12_596_224, cpu) == "prefix"
    assert choose_layout(8, 20, 12_596_224, cpu) == "prefix"
    # ... on a GPU at 16 x 64 they do not (measured on an H100: sequence 0.99x PEFT, prefix 0.53x).
    assert choose_layout(16, 8, 12_596_224, cuda) == "sequence"
    assert choose_layout(16, 0, 49_920, cpu) == "prefix"  # no virtual tokens: nothing to choose
    # "auto" runs what it chooses: here, on a tiny model, the sequence layout.
    torch.manual_seed(1)
    model = SoftPromptModel(base_model, METHODS["prompt-tuning"])
    batch = _batch([9, 4, 6, 1], num_tokens=9, labels="last2")
    auto, _ = _loss_and_grads(model, batch, "torch", virtual_token_layout="auto")
    sequence, _ = _loss_and_grads(model, batch, "torch", virtual_token_layout="sequence")
    assert torch.equal(auto, sequence)
