"""Adaption prompt (LLaMA-Adapter): against PEFT on the families PEFT runs it on, against each row alone and the
base model on every family, under gradient checkpointing, through both adapter formats and from the command line.

PEFT 0.21.2 adapts Llama, Mistral and GPT-2 only. There, a PEFT adapter with random weights and non-zero gates
(a zero gate hides every mistake but the gate's own) must give softprompt's loss, logits, gradients and greedy ids,
and softprompt's PEFT export must load in PEFT. Every other family is reached through its `AttentionAccess`
(`softprompt.attention`); there each row of a left-padded batch mixing adaption prompts with the other methods must
compute what it computes alone, and a zero gate must be the base model.

Shapes: B batch, T tokens, A adapter tokens, N_a adapted layers, V vocab.
"""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import softprompt
import softprompt.families
from softprompt import AdaptionPromptConfig, SoftPromptModel
from softprompt.cli import main
from softprompt.families import family_named
from softprompt.methods import adaption_prompt
from softprompt.multi_task import make_trainable
from softprompt.params import meta_base_model, parameter_counts
from softprompt.quickstart import build_tiny_model
from softprompt.seams import enable_activation_checkpointing
from softprompt.training import TrainConfig, read_metrics, train

from helpers import (
    FAMILY_MODEL_TYPES,
    assert_each_row_computes_what_it_computes_alone,
    greedy_by_forward,
    random_batch,
)

# fp32 on CPU. Both sides run the same operations on the same numbers; what differs is summation order (another
# batch size or key length, a division by sqrt(D) instead of a product with its inverse), a few ulps of logits of
# order 1-10 (measured: <= 2.5e-6 against PEFT, <= 1.2e-5 on logits near 10 against a row alone).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB_SIZE = 300
PAD_ID = 3
GENERATION = dict(eos_token_id=None, pad_token_id=PAD_ID)  # no EOS: every row runs all its new tokens
PEFT_FAMILIES = ["llama", "mistral", "gpt2"]
CONFIG = AdaptionPromptConfig(adapter_len=3, adapter_layers=2)  # the tiny models have 2 layers: both adapted


def tiny_base(model_type: str) -> torch.nn.Module:
    """The family's tiny model, its projection biases (BLOOM's, GPT-2's, GPT-NeoX's, OPT's, Qwen2's) drawn at
    random: the families' initializations zero them, which would hide a bias missed or added twice."""
    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(2)
        for module in base.modules():
            if isinstance(module, torch.nn.Linear | Conv1D) and module.bias is not None:
                module.bias.normal_(std=0.3)
    return base


def with_random_gates(model: SoftPromptModel, *names: str) -> SoftPromptModel:
    """Gates drawn from N(0, 1): at init they are 0, and a zero gate hides the whole adapter term."""
    with torch.no_grad():
        for name in names or tuple(model.prompts):
            model.prompts[name].adaption_gate.normal_()
    return model


def peft_adapter(base: torch.nn.Module) -> PeftModel:
    """PEFT's adaption prompt on a copy of `base` (tokens N(0, 1)), its gates set to N(0, 1)."""
    theirs = get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        task_type=TaskType.CAUSAL_LM, adapter_len=CONFIG.adapter_len, adapter_layers=CONFIG.adapter_layers))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name.endswith("adaption_gate"):
                parameter.normal_()
    return theirs.eval()


def peft_gradients(theirs: PeftModel, kind: str) -> torch.Tensor:
    """PEFT's ``[1, ...]`` per-layer gradients of `kind` (``adaption_prompt`` / ``adaption_gate``), stacked in layer
    order as softprompt keeps them."""
    return torch.cat([parameter.grad for name, parameter in theirs.named_parameters() if name.endswith(kind)])


# ---------------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("model_type", PEFT_FAMILIES)
def test_a_peft_adapter_gives_pefts_loss_logits_gradients_and_greedy_ids(model_type, tmp_path):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    theirs = peft_adapter(base)
    theirs.save_pretrained(tmp_path)
    ours = SoftPromptModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert ours.prompts["default"].adaption_gate.abs().min() > 0.01  # the gates came along

    batch = random_batch([7, 4, 6], "right")
    real = batch["attention_mask"].bool()
    their_output = theirs(**batch)
    their_output.loss.backward()
    our_output = ours(**batch)
    torch.testing.assert_close(our_output.logits[real], their_output.logits[real], **TOLERANCE)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    module = ours.prompts["default"]
    for layout in ("prefix", "sequence"):  # the training loss, both layouts: the same value and gradients
        module.zero_grad()
        loss = ours.compute_loss(**batch, virtual_token_layout=layout)
        torch.testing.assert_close(loss, their_output.loss, **TOLERANCE)
        loss.backward()
        torch.testing.assert_close(module.adaption_prompt.grad, peft_gradients(theirs, "adaption_prompt"), **TOLERANCE)
        torch.testing.assert_close(module.adaption_gate.grad, peft_gradients(theirs, "adaption_gate"), **TOLERANCE)
    assert module.adaption_prompt.grad.abs().max() > 1e-3  # non-zero gates: the tokens are trained too

    prompt = random_batch([6, 6], "right", seed=1)  # unpadded: PEFT's and softprompt's positions agree
    prompt = {key: prompt[key] for key in ("input_ids", "attention_mask")}
    by_forward = greedy_by_forward(theirs, **prompt, max_new_tokens=6)
    generated = ours.generate(**prompt, max_new_tokens=6, do_sample=False, **GENERATION)
    assert torch.equal(generated, by_forward)
    with torch.no_grad():  # PEFT's generate is right for this method (unlike its prompt-learning ones)
        assert torch.equal(theirs.generate(**prompt, max_new_tokens=6, do_sample=False, **GENERATION), by_forward)


@pytest.mark.parametrize("model_type", PEFT_FAMILIES)
def test_softprompts_peft_export_loads_in_peft_and_counts_equal_pefts(model_type, tmp_path):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    fresh = SoftPromptModel(base, copy.deepcopy(CONFIG))
    theirs_fresh = get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        task_type=TaskType.CAUSAL_LM, adapter_len=CONFIG.adapter_len, adapter_layers=CONFIG.adapter_layers))
    assert fresh.num_parameters() == theirs_fresh.get_nb_trainable_parameters()  # (trainable, all)

    ours = with_random_gates(fresh)
    ours.save_pretrained(tmp_path / "ours", format="peft")
    theirs_fresh.save_pretrained(tmp_path / "theirs")
    saved = {name: tuple(tensor.shape) for name, tensor in
             load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    expected = {name: tuple(tensor.shape) for name, tensor in
                load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}
    assert saved == expected  # PEFT's names (the base's module paths) and shapes
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    batch = random_batch([5, 7], "right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits[real], ours(**batch).logits[real], **TOLERANCE)


def test_counts_on_a_real_llama_shape_equal_pefts():
    """SmolLM2-135M's shape (30 layers, C 576, 9 heads sharing 3), on the meta device: A=10 in all 30 layers is
    30 * (10 * 576 + 1) = 172,830 trainable parameters (the notes measured PEFT's 172,830 / 134,687,838)."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    adapter = AdaptionPromptConfig(adapter_len=10, adapter_layers=30)
    (count,) = parameter_counts(config, {"adaption prompt": adapter})
    theirs = get_peft_model(meta_base_model(config), peft.AdaptionPromptConfig(
        task_type=TaskType.CAUSAL_LM, adapter_len=10, adapter_layers=30))
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()


def test_a_zero_gate_gives_the_base_model_except_where_pefts_does_not():
    """PEFT's Llama composition calls a biased ``o_proj`` on the adapter's values too, so its zero gate adds the
    bias a second time; softprompt follows PEFT there. Everywhere else softprompt uses the output projection's
    weight alone: BLOOM, GPT-NeoX and OPT have biased output projections, and their zero gate is the base model
    (``test_every_family_mixed_with_the_other_methods``)."""
    config = family_named("llama").tiny_config(VOCAB_SIZE)
    config.attention_bias = True
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for module in base.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_()
    batch = random_batch([6, 6], "right")
    del batch["labels"]
    with torch.no_grad():
        expected = base(**batch).logits
        ours = SoftPromptModel(base, copy.deepcopy(CONFIG))(**batch).logits
        theirs = get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
            task_type=TaskType.CAUSAL_LM, adapter_len=3, adapter_layers=2)).eval()(**batch).logits
    assert (theirs - expected).abs().max() > 1e-2  # PEFT's zero gate is not the base model here
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


# ---------------------------------------------------------------------------------------------- every family


MIXED = {
    "long": AdaptionPromptConfig(adapter_len=3, adapter_layers=2),
    "short": AdaptionPromptConfig(adapter_len=5, adapter_layers=1),
    "prompt": softprompt.PromptTuningConfig(num_virtual_tokens=4),
    "prefix": softprompt.PrefixTuningConfig(num_virtual_tokens=3),
}
MIXED_ROWS = [("long", 7), ("prompt", 5), ("short", 4), (None, 6), ("prefix", 3), ("long", 2)]
"""(adapter, real tokens): two adaption prompts (different layers and lengths) beside prompt tuning, prefix tuning
and the base model alone, left-padded to 7."""
PATCHED_ROWS = [row for row, (name, _) in enumerate(MIXED_ROWS) if name in ("long", "short")]
"""The adaption-prompt rows."""


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_every_family_mixed_with_the_other_methods(model_type):
    """Runs on every family: each row of a left-padded mixed batch gives what it gives alone (logits; for the
    adaption-prompt rows also the loss in both layouts, greedy and beam ids; every adapter's gradient from its own
    rows only); a zero gate is the base model, biased output projections included; the engine equals the method's
    plain reference."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    zero = SoftPromptModel(base, copy.deepcopy(CONFIG))
    batch = random_batch([n for _, n in MIXED_ROWS], "left")
    plain = {key: batch[key][3:4, 1:] for key in ("input_ids", "attention_mask")}  # an unpadded row
    with torch.no_grad():
        # Zero gates: the adapter term is exactly 0 (its bias included where PEFT adds none), the base model itself.
        assert torch.equal(zero(**plain).logits, base(**plain).logits)
        assert torch.equal(zero(**batch).logits, base(**batch, **softprompt.positions.position_inputs(
            zero.family, batch["attention_mask"], batch["input_ids"].shape[1])).logits)
        # Non-zero gates: the engine equals the method's plain reference on left padding.
        with_random_gates(zero)
        reference = adaption_prompt.reference_forward(base, zero.prompts["default"], **batch)
        ours = zero(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[real], reference.logits[real], **TOLERANCE)
    torch.testing.assert_close(ours.loss, reference.loss, **TOLERANCE)
    assert (ours.logits[real] - base(**batch).logits[real]).abs().max() > 1e-3  # the term is there

    names = list(MIXED)
    model = SoftPromptModel(base, copy.deepcopy(MIXED[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, copy.deepcopy(MIXED[name]))
    with_random_gates(model, "long", "short")
    # The other methods' rows: their logits show that no term leaks into them (tests/test_families.py checks the
    # rest of them); the adaption-prompt rows: everything.
    assert_each_row_computes_what_it_computes_alone(model, batch, MIXED_ROWS, GENERATION, checked=PATCHED_ROWS,
                                                    tolerance=TOLERANCE, new_tokens=4)


@pytest.mark.parametrize("model_type", [model_type for model_type in FAMILY_MODEL_TYPES if model_type != "gpt2"])
def test_the_term_is_the_layers_own_attention_over_the_adapter_tokens_at_no_position(model_type):
    """An oracle outside softprompt's attention code: the layer's own attention module, called on the adapter
    tokens followed by the hidden states, with a mask that lets every query see only the adapter tokens, and with
    those tokens at no position (rotation by angle 0, no ALiBi bias). Its output at the real positions is the
    output projection of ``softmax(scores) @ values`` as the layer computes them (projections, fused layouts,
    query/key norms, partial rotary, grouped-query heads, scale, soft-capping): the ungated term, plus the output
    bias. GPT-2 is left out: there the attended values join after ``c_proj`` without it (PEFT's composition, tested
    against PEFT above)."""
    base = tiny_base(model_type)
    if getattr(base.config, "attn_logit_softcapping", None):
        # transformers' SDPA path drops Gemma-2's soft-capping, and 5.15 chooses it by default (5.25: eager); the
        # term follows the model's definition, so the oracle runs the layer as defined.
        base.set_attn_implementation("eager")
    torch.manual_seed(1)
    model = SoftPromptModel(base, copy.deepcopy(CONFIG))
    module = model.prompts["default"]
    with torch.no_grad():
        module.adaption_gate.fill_(1.0)
    family, shape = model.family, model.shape
    layers = adaption_prompt.layers_of(CONFIG, base)
    calls = {}
    handles = [adapted.attention.register_forward_hook(
        lambda attention, args, kwargs, output, index=adapted.index: calls.__setitem__(index, (args, kwargs, output)),
        with_kwargs=True) for adapted in layers]
    batch = random_batch([6, 4], "left")
    with torch.no_grad():
        model.base_model(**{key: batch[key] for key in ("input_ids", "attention_mask")},
                         **softprompt.positions.position_inputs(family, batch["attention_mask"], 6))
    for handle in handles:
        handle.remove()

    for offset, adapted in enumerate(layers):
        args, kwargs, output = calls[adapted.index]
        hidden_states = softprompt.attention.hidden_states_of(args, kwargs)  # [B, T, C]
        batch_size, num_tokens, _ = hidden_states.shape
        tokens = module.adaption_prompt[offset].detach()  # [A, C]
        length = len(tokens) + num_tokens
        args, kwargs = list(args), dict(kwargs)
        sequence = torch.cat([tokens.expand(batch_size, -1, -1), hidden_states], dim=1)  # [B, A + T, C]
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = sequence
        else:
            args[0] = sequence
        if len(args) > 1:  # BLOOM's residual, added inside its attention module
            args[1] = torch.zeros_like(sequence)
        for name in ("cache", "past_key_values", "layer_past"):  # the cache's names before and after 5.24
            kwargs.pop(name, None)
        kwargs["use_cache"] = False
        if "alibi" in kwargs:  # no ALiBi bias for any key
            kwargs["alibi"] = torch.zeros(batch_size * shape.num_heads, 1, length)
        if "position_embeddings" in kwargs:  # the adapter tokens rotated by angle 0: not at all
            cos, sin = (part.expand(batch_size, -1, -1) for part in kwargs["position_embeddings"])
            unrotated = torch.ones_like(cos[:, :1]).expand(-1, len(tokens), -1), torch.zeros_like(sin[:, :1])
            kwargs["position_embeddings"] = (torch.cat([unrotated[0], cos], 1),
                                             torch.cat([unrotated[1].expand(-1, len(tokens), -1), sin], 1))
        mask = torch.full((batch_size, 1, length, length), torch.finfo(sequence.dtype).min)
        mask[..., : len(tokens)] = 0  # every query sees the adapter tokens alone
        kwargs["attention_mask"] = mask
        with torch.no_grad():
            layer_output = adapted.attention(*args, **kwargs)[0][:, len(tokens) :]  # [B, T, C]
            projection = getattr(adapted.attention, family.attention.output)
            expected = layer_output if projection.bias is None else layer_output - projection.bias
            hook = adaption_prompt.layer_hook(module, offset, family, shape, None)
            ours = hook(adapted.attention, calls[adapted.index][0], calls[adapted.index][1], output)[0] - output[0]
        torch.testing.assert_close(ours, expected, **TOLERANCE, msg=f"layer {adapted.index}")


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_gradient_checkpointing_recomputes_the_adapted_layers_exactly(model_type):
    """transformers recomputes a checkpointed layer in the backward pass, after the call's hooks are gone; the
    layers' checkpointing functions register them again for the recomputation (`HooksForOneCall`)."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_gates(SoftPromptModel(base, copy.deepcopy(CONFIG))).train()
    batch = random_batch([6, 4], "left")
    module = model.prompts["default"]

    def loss_and_gradients() -> tuple[torch.Tensor, ...]:
        model.zero_grad()
        loss = model.compute_loss(**batch)
        loss.backward()
        return loss.detach(), module.adaption_prompt.grad.clone(), module.adaption_gate.grad.clone()

    layers = [module for module in base.modules() if hasattr(module, "_can_checkpoint_with_cache")]
    calls = []
    for layer in layers:  # the MLP's last linear layer, which the adapter term never calls: recomputation runs it again
        last_linear = [module for module in layer.modules() if isinstance(module, torch.nn.Linear | Conv1D)][-1]
        last_linear.register_forward_pre_hook(lambda module, args: calls.append(module))
    plain = loss_and_gradients()
    calls.clear()
    enable_activation_checkpointing(base)
    checkpointed = loss_and_gradients()
    assert len(calls) == 2 * len(layers), "each layer ran again in the backward pass: checkpointing was active"
    for expected, actual in zip(plain, checkpointed):  # the same operations on the same inputs: bit-identical
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert all("_gradient_checkpointing_func" in layer.__dict__ for layer in layers)  # put back after the call


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_two_calls_before_one_backward_each_recompute_with_their_own_adapter(use_reentrant):
    """Gradient accumulation in one graph: two calls with different adapters, then one backward; each
    recomputation runs with its own call's hooks, not the other's nor none."""
    base = tiny_base("llama")
    torch.manual_seed(1)
    model = SoftPromptModel(base, copy.deepcopy(MIXED["long"]), adapter_name="long")
    model.add_adapter("short", copy.deepcopy(MIXED["short"]))
    with_random_gates(model).train()
    make_trainable(model, ["long", "short"])
    first, second = random_batch([6, 4], "left"), random_batch([5, 5], "left", seed=1)

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        loss = model.compute_loss(**first, adapter_names=["long", "short"])
        loss = loss + model.compute_loss(**second, adapter_names=["short", "long"])
        loss.backward()
        return [parameter.grad.clone() for parameter in model.prompts.parameters()]

    expected = gradients()
    enable_activation_checkpointing(base, use_reentrant=use_reentrant)
    for actual, wanted in zip(gradients(), expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_adapters_round_trip_through_both_formats(model_type, tmp_path):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = with_random_gates(SoftPromptModel(base, copy.deepcopy(CONFIG)))
    batch = random_batch([5, 3], "left")
    for format in ("softprompt", "peft"):
        model.save_pretrained(tmp_path / format, format=format)
        loaded = SoftPromptModel.from_pretrained(base, tmp_path / format)
        assert sorted(loaded.state_dict()) == ["prompts.default.adaption_gate", "prompts.default.adaption_prompt"]
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (format, key)
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, model(**batch).logits), format
    with pytest.raises(softprompt.AdapterFormatError, match=r"materialized_only=True, but adaption_prompt adapters "
                       r"have no single output table"):
        softprompt.pretrained.read_adapter(tmp_path / "softprompt", base, materialized_only=True)
    attention = family_named(model_type).attention.module
    names = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(f".{attention}.adaption_" in name and name.startswith("base_model.model.") for name in names)
    assert len(names) == 2 * CONFIG.adapter_layers


def test_the_model_card_names_the_method_and_its_parameters(tiny_bloom):
    model = SoftPromptModel(tiny_bloom, copy.deepcopy(CONFIG))
    card = softprompt.hub.model_card(model, ["default"], "softprompt", "someone/adapter")
    assert "| `default` | adaption-prompt | - | 194 | the top folder |" in card  # 2 * (3 * 32 + 1), no virtual tokens


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("fields", "message"), [
    (dict(adapter_layers=2), r"adapter_len=None: expected a positive int\. Fix: pass e\.g\. AdaptionPromptConfig"),
    (dict(adapter_len=3), r"adapter_layers=None: expected a positive int"),
    (dict(adapter_len=0, adapter_layers=2), r"adapter_len=0: expected a positive int"),
    (dict(adapter_len=True, adapter_layers=2), r"adapter_len=True: expected a positive int"),
    (dict(adapter_len=3, adapter_layers=-1), r"adapter_layers=-1: expected a positive int"),
    (dict(adapter_len=3, adapter_layers=2, target_modules=""), r"target_modules='': expected the name of each "
     r"layer's attention submodule, or None"),
])
def test_config_values_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        AdaptionPromptConfig(**fields)


def test_settings_that_do_not_fit_the_model_are_refused(tmp_path):
    base = tiny_base("bloom")
    with pytest.raises(ValueError, match=r"target_modules='self_attn': adaption prompt adapts each layer's attention "
                       r"submodule, which this BLOOM model calls 'self_attention'\. Fix: leave target_modules=None"):
        SoftPromptModel(base, AdaptionPromptConfig(adapter_len=3, adapter_layers=1, target_modules="self_attn"))
    with pytest.raises(ValueError, match=r"adapter_layers=3: this BLOOM model has 2 attention layers\. Fix: pass "
                       r"adapter_layers=2 or fewer"):
        SoftPromptModel(base, AdaptionPromptConfig(adapter_len=3, adapter_layers=3))
    with pytest.raises(ValueError, match=r"adapter_len=1000000000000: the \[2, 1000000000000, 32\] fp32 adapter tokens "
                       r"need 238,418.6 GiB, more than the .* GiB of memory on cpu\. .* Fix: pass e\.g\. adapter_len=10"):
        SoftPromptModel(base, AdaptionPromptConfig(adapter_len=10**12, adapter_layers=2))  # refused before allocating
    # PEFT's own name for it is accepted, as PEFT writes it into its files.
    named = SoftPromptModel(base, AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                       target_modules="self_attention"))
    assert named.num_parameters()[0] == 1 * (3 * 32 + 1)


def test_a_family_whose_attention_cannot_be_reached_is_refused_naming_what_is_missing(monkeypatch):
    """Every supported family has its `AttentionAccess`; one without it is refused before anything is built."""
    llama = family_named("llama")
    unreachable = dataclasses.replace(llama, attention=None,
                                      attention_missing="its queries are computed inside a fused kernel")
    monkeypatch.setitem(softprompt.families._BY_MODEL_TYPE, "llama", unreachable)
    with pytest.raises(ValueError, match=r"adaption prompt works inside attention, and softprompt cannot reach Llama's "
                       r"attention layers: its queries are computed inside a fused kernel\. Fix: use a method that "
                       r"enters at the embeddings or the cache"):
        SoftPromptModel(tiny_base("llama"), copy.deepcopy(CONFIG))
    assert all(family.attention is not None for family in softprompt.families.FAMILIES)


def test_a_rotary_layer_called_without_its_positions_is_refused():
    base = tiny_base("llama")
    attention = base.model.layers[0].self_attn
    access = family_named("llama").attention
    shape = family_named("llama").shape(base.config)
    with pytest.raises(RuntimeError, match=r"LlamaAttention was called without position_embeddings"):
        softprompt.attention.queries(access, attention, torch.zeros(1, 2, 32), {}, shape)


# ---------------------------------------------------------------------------------------------- command line, runs


SHORT = ["--split", "train[:60]", "--num-generations", "0", "--no-progress"]
"""48 training rows (6 steps of 8 per epoch) and 12 held-out rows of the shipped complaints data."""


def test_training_from_the_command_line_on_the_embedded_bloom(tmp_path, capsys):
    flags = [*SHORT, "--method", "adaption-prompt", "--num-epochs", "3"]
    assert main(["train", *flags, "--output-dir", str(tmp_path / "defaults")]) == 0  # PEFT has no defaults: ours
    defaults = SoftPromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "defaults" / "base-model"),
                                               tmp_path / "defaults" / "adapter")
    assert defaults.adapter_configs["default"] == AdaptionPromptConfig(adapter_len=10, adapter_layers=2)
    assert main(["train", *flags, "--adapter-len", "0", "--output-dir", str(tmp_path / "refused")]) == 2
    assert "adapter_len=0: expected a positive int" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", *flags, "--adapter-len", "4", "--adapter-layers", "2", "--output-dir", str(run)]) == 0
    evaluations = [record["loss"] for record in read_metrics(run / "metrics.jsonl") if record["event"] == "eval"]
    assert evaluations[-1] < evaluations[0] - 0.5  # it learns (measured: 9.03 -> 8.09 in 18 steps)
    loaded = SoftPromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base-model"), run / "adapter")
    assert loaded.adapter_configs["default"] == AdaptionPromptConfig(adapter_len=4, adapter_layers=2)
    assert loaded.prompts["default"].adaption_gate.abs().min() > 0  # trained away from zero
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "Tweet text : thanks Label :",
                 "--max-new-tokens", "3"]) == 0
    assert main(["params", "--method", "adaption-prompt", "--adapter-len", "10", "--adapter-layers", "28",
                 "--model", "Qwen/Qwen3-0.6B"]) == 0
    assert "trainable params: 286,748 ||" in capsys.readouterr().out  # 28 * (10 * 1024 + 1)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_adapter(tmp_path):
    """A run stopped after its first epoch-end checkpoint resumes into the next epoch and ends bit for bit where the
    uninterrupted run ended."""
    def config(directory: str, **overrides) -> TrainConfig:
        values = dict(split="train[:60]", num_generations=0, progress=False, num_epochs=2, save_every=0, keep_last=2,
                      method="adaption-prompt", adapter_len=4, adapter_layers=2, output_dir=str(tmp_path / directory))
        return TrainConfig.from_dict({**values, **overrides})

    uninterrupted = train(config("uninterrupted"))
    first = train(config("run"))
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    for path in [checkpoints[-1], first.adapter_directories["default"]]:
        for file in sorted(path.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        path.rmdir()
    resumed = train(config("run", resume=True))
    assert resumed.resumed_from == checkpoints[0] and resumed.global_step == uninterrupted.global_step == 12
    ours = load_file(resumed.adapter_directories["default"] / "adapter.safetensors")
    expected = load_file(uninterrupted.adapter_directories["default"] / "adapter.safetensors")
    assert ours.keys() == expected.keys() and all(torch.equal(ours[key], expected[key]) for key in expected)
