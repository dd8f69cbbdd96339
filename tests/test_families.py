"""Every supported decoder family, exactly: against PEFT with the same weights, against each row run alone, and
against the base model itself.

One tiny random model per family (`Family.tiny_config`: grouped-query heads, a head size apart from C / H, narrow
OPT embeddings, Gemma's scaled embeddings and soft-capped logits, learned and rotary positions), on random token ids.
The families under test are `helpers.FAMILY_MODEL_TYPES`; a supported family missing there fails the first test.

Shapes: B batch, T tokens, P virtual tokens, V vocab.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

import softprompt
from softprompt import SoftPromptModel, UnsupportedModelError, supported_model_types
from softprompt.families import family_named
from softprompt.methods.prefix_tuning import merge_key_values
from softprompt.quickstart import build_tiny_model
from softprompt.seams import cache_argument, enable_activation_checkpointing

from helpers import (
    FAMILY_MODEL_TYPES,
    assert_each_row_computes_what_it_computes_alone,
    greedy_by_forward,
    random_batch,
)
from peft_reference import peft_config_for, peft_refusal, peft_twin

# fp32 on CPU. Both sides run the same kernels on the same numbers; what differs is summation order (another batch
# size, key length or cache split), a few ulps of logits of order 1-10 (measured: <= 2e-6 over these families).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB_SIZE = 300
PAD_ID = 3
GENERATION = dict(eos_token_id=None, pad_token_id=PAD_ID)  # no EOS: every row runs all its new tokens

VARIANTS = {
    "prompt": softprompt.PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning-mlp": softprompt.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16),
    "p-tuning-lstm": softprompt.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
    ),
    "prefix": softprompt.PrefixTuningConfig(num_virtual_tokens=3),
    "prefix-projection": softprompt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True,
                                                       encoder_hidden_size=12),
}


def tiny_base(model_type: str) -> torch.nn.Module:
    return build_tiny_model(model_type, VOCAB_SIZE, seed=0)


def num_virtual(config) -> int:
    return 0 if isinstance(config, softprompt.PrefixTuningConfig) else config.num_virtual_tokens


def test_every_supported_family_is_under_test():
    assert sorted(FAMILY_MODEL_TYPES) == supported_model_types()


def test_an_unsupported_family_is_refused_with_the_supported_ones():
    from transformers import MambaConfig, MambaForCausalLM

    base = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'mamba' is not supported: softprompt knows bloom, "
                                                    r"gemma2, .*llama.*Fix: use a model of one of those families"):
        SoftPromptModel(base, softprompt.PromptTuningConfig(num_virtual_tokens=2))


# ------------------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_every_method_equals_peft(model_type, variant, padding):
    """Loss, real-position logits, the gradient of every trainable tensor, and greedy ids (PEFT's forward run token
    by token: its generate breaks on transformers 5.24)."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    ours = SoftPromptModel(base, copy.deepcopy(VARIANTS[variant]))
    theirs = peft_twin(ours, base)
    batch = random_batch([7, 7] if padding == "none" else [7, 4], "right")
    our_output, their_output = ours(**batch), theirs(**batch)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    real = batch["attention_mask"].bool()
    offset = num_virtual(VARIANTS[variant])
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, offset:][real], **TOLERANCE)
    for layout in ("prefix", "sequence"):
        torch.testing.assert_close(ours.compute_loss(**batch, virtual_token_layout=layout), their_output.loss,
                                   **TOLERANCE, msg=layout)

    our_output.loss.backward()
    their_output.loss.backward()
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in ours.prompts["default"].named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        their_gradient = their_parameters[f"prompt_encoder.default.{name}"].grad
        torch.testing.assert_close(parameter.grad, their_gradient, **TOLERANCE, msg=f"gradient of {name}")

    if padding == "none":
        prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
        our_ids = ours.generate(**prompt, max_new_tokens=5, do_sample=False, **GENERATION)
        assert torch.equal(our_ids, greedy_by_forward(theirs, **prompt, max_new_tokens=5))


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_sampling_equals_the_base_model_generating_from_pefts_prompt(model_type):
    """Sampled ids, one prompt-tuning and one prefix adapter: transformers' own generate on the base, holding PEFT's
    virtual tokens in inputs_embeds or PEFT's prefix in a DynamicCache, draws the same ids from the same seed."""
    base = tiny_base(model_type)
    prompt = {key: value for key, value in random_batch([6, 6], "left").items() if key != "labels"}
    options = dict(max_new_tokens=5, do_sample=True, top_k=8, **GENERATION)
    for variant in ("prompt", "prefix"):
        torch.manual_seed(1)
        ours = SoftPromptModel(base, copy.deepcopy(VARIANTS[variant]))
        theirs = peft_twin(ours, base)
        torch.manual_seed(2)
        our_ids = ours.generate(**prompt, **options)
        torch.manual_seed(2)
        with torch.no_grad():
            if variant == "prefix":
                cache = DynamicCache(config=base.config)
                for layer, past in enumerate(theirs.get_prompt(2).layers):
                    cache.update(past.keys, past.values, layer)
                mask = torch.cat([torch.ones(2, 3, dtype=torch.long), prompt["attention_mask"]], dim=1)
                reference = base.generate(input_ids=prompt["input_ids"], attention_mask=mask,
                                          **cache_argument(base, cache), **options)
            else:
                embeddings = torch.cat([theirs.get_prompt(2), base.get_input_embeddings()(prompt["input_ids"])], 1)
                mask = torch.cat([torch.ones(2, 4, dtype=torch.long), prompt["attention_mask"]], dim=1)
                new = base.generate(inputs_embeds=embeddings, attention_mask=mask, **options)
                reference = torch.cat([prompt["input_ids"], new], dim=1)
        assert torch.equal(our_ids, reference), variant


# ------------------------------------------------------------------------------------------ each row as alone

MIXED_ROWS = [("prompt", 7), ("prefix", 7), (None, 5), ("p-tuning-mlp", 4), ("prefix-projection", 6), ("prompt", 3)]
"""(adapter, real tokens): all three methods, lengths 2 to 5, one base-model row, left-padded to 7."""


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_left_padded_mixed_batch_gives_every_row_what_it_gives_alone(model_type):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    adapters = sorted({name for name, _ in MIXED_ROWS if name is not None})
    model = SoftPromptModel(base, copy.deepcopy(VARIANTS[adapters[0]]), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, copy.deepcopy(VARIANTS[name]))
    batch = random_batch([n for _, n in MIXED_ROWS], "left")
    assert_each_row_computes_what_it_computes_alone(model, batch, MIXED_ROWS, GENERATION, tolerance=TOLERANCE)


@pytest.mark.parametrize("variant", ["prompt", "prefix"])
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_the_engine_equals_the_methods_plain_reference_on_left_padding(model_type, variant):
    """The method file's reference_forward (PEFT's layout, with the position rule) and the engine agree on a
    left-padded batch, where PEFT's own positions differ (see benchmarks/positions.py)."""
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = SoftPromptModel(base, copy.deepcopy(VARIANTS[variant]))
    batch = random_batch([7, 3, 5], "left")
    method = softprompt.methods.method_of(model.active_config)
    reference_forward = {"prompt_tuning": softprompt.methods.prompt_tuning.reference_forward,
                         "prefix_tuning": softprompt.methods.prefix_tuning.reference_forward}[method.name]
    with torch.no_grad():
        reference = reference_forward(base, model.prompts["default"](), **batch)
        ours = model(**batch)
    real = batch["attention_mask"].bool()
    offset = num_virtual(model.active_config)
    torch.testing.assert_close(ours.logits[real], reference.logits[:, offset:][real], **TOLERANCE)
    torch.testing.assert_close(ours.loss, reference.loss, **TOLERANCE)


# ------------------------------------------------------------------------------------------------ identities


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_prompt_of_real_token_embeddings_is_the_base_model_on_those_tokens(model_type):
    base = tiny_base(model_type)
    context = torch.randint(4, VOCAB_SIZE, (5,), generator=torch.Generator().manual_seed(3))
    batch = random_batch([6, 4], "left")
    mask = torch.cat([torch.ones(2, 5, dtype=torch.long), batch["attention_mask"]], dim=1)
    ids = torch.cat([context.expand(2, -1), batch["input_ids"]], dim=1)
    model = SoftPromptModel(base, softprompt.PromptTuningConfig(num_virtual_tokens=5))
    with torch.no_grad():
        model.prompts["default"].embedding.weight.copy_(base.get_input_embeddings()(context))
        # The rule's positions: what generate gives the concatenation (the base forward without them would count
        # the second row's padding).
        expected = base(input_ids=ids, attention_mask=mask, **position_arguments(base, mask)).logits[:, 5:]
        actual = model(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[real], expected[real], **TOLERANCE)
    generated = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, **GENERATION)
    reference = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **GENERATION)
    assert torch.equal(generated, reference[:, 5:])


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_prefix_of_the_models_own_cache_is_the_base_model_continuing(model_type):
    base = tiny_base(model_type)
    context = torch.randint(4, VOCAB_SIZE, (4,), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(input_ids=context[None], use_cache=True, **cache_argument(base, cache))
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, K, P, D]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    model = SoftPromptModel(base, softprompt.PrefixTuningConfig(num_virtual_tokens=4))
    batch = random_batch([6, 3], "left")
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), batch["attention_mask"]], dim=1)
    ids = torch.cat([context.expand(2, -1), batch["input_ids"]], dim=1)
    with torch.no_grad():
        model.prompts["default"].embedding.weight.copy_(merge_key_values(keys, values))
        expected = base(input_ids=ids, attention_mask=mask, **position_arguments(base, mask)).logits[:, 4:]
        actual = model(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    # The context's keys and values come from a separate pass (other matmul shapes): a few ulps.
    torch.testing.assert_close(actual[real], expected[real], **TOLERANCE)
    generated = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, **GENERATION)
    reference = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **GENERATION)
    assert torch.equal(generated, reference[:, 4:])


def position_arguments(base, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Positions counted over each row's visible tokens, for families that take them."""
    from softprompt.positions import position_inputs

    return position_inputs(family_named(base.config.model_type), mask, mask.shape[1])


# ------------------------------------------------------------------------------------------ checkpointing, files


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_prefix_tuning_under_gradient_checkpointing_is_exact(model_type):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = SoftPromptModel(base, copy.deepcopy(VARIANTS["prefix"]))
    model.train()
    batch = random_batch([6, 4], "left")

    def loss_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        loss = model.compute_loss(**batch, virtual_token_layout="prefix")
        loss.backward()
        return loss.detach(), model.prompts["default"].embedding.weight.grad.clone()

    layers = [module for module in base.modules() if hasattr(module, "_can_checkpoint_with_cache")]
    calls = []
    for layer in layers:  # a linear layer inside each: recomputation runs it again (the layer's own hooks, once)
        first_linear = next(module for module in layer.modules() if isinstance(module, torch.nn.Linear | Conv1D))
        first_linear.register_forward_pre_hook(lambda module, args: calls.append(module))
    plain = loss_and_gradient()
    assert len(calls) == len(layers)
    calls.clear()
    enable_activation_checkpointing(base)
    checkpointed = loss_and_gradient()
    assert len(calls) == 2 * len(layers), "each layer ran again in the backward pass: checkpointing was active"
    # Recomputation repeats the same operations on the same inputs: bit-identical.
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["p-tuning-mlp", "prefix", "prefix-projection"])
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_adapters_round_trip_through_both_formats(model_type, variant, tmp_path):
    base = tiny_base(model_type)
    torch.manual_seed(1)
    model = SoftPromptModel(base, copy.deepcopy(VARIANTS[variant]))
    batch = random_batch([6, 4], "right")
    real = batch["attention_mask"].bool()
    offset = num_virtual(model.active_config)
    with torch.no_grad():
        expected = model(**batch).logits
        model.save_pretrained(tmp_path / "ours")
        assert torch.equal(SoftPromptModel.from_pretrained(base, tmp_path / "ours", format="softprompt")(**batch).logits, expected)
        model.save_pretrained(tmp_path / "to-peft", format="peft")
        peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to-peft").eval()
        torch.testing.assert_close(peft_loaded(**batch).logits[:, offset:][real], expected[real], **TOLERANCE)
        peft_twin(model, base).save_pretrained(tmp_path / "from-peft")
        imported = SoftPromptModel.from_pretrained(base, tmp_path / "from-peft", format="peft")
        torch.testing.assert_close(imported(**batch).logits[real], expected[real], **TOLERANCE)


# ----------------------------------------------------------------------------------------------------- limits


def test_a_sliding_window_hides_no_prompt_and_longer_inputs_are_refused():
    """Mistral's layers attend within sliding_window positions. Prompt + text within it: exact (PEFT equal);
    beyond it the window would hide the prompt from later tokens, so training and generation refuse."""
    config = family_named("mistral").tiny_config(VOCAB_SIZE)
    config.sliding_window = 10
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = type(build_tiny_model("mistral", VOCAB_SIZE))(config).eval()
    torch.manual_seed(1)
    model = SoftPromptModel(base, softprompt.PromptTuningConfig(num_virtual_tokens=4))
    fits = random_batch([6, 6], "left")
    torch.testing.assert_close(model(**fits).loss, peft_twin(model, base)(**fits).loss, **TOLERANCE)
    too_long = random_batch([7, 7], "left")
    message = r"11 positions .* exceed the sliding attention window of 10 positions of this Mistral model.*Fix:"
    with pytest.raises(ValueError, match=message):
        model(**too_long)
    with pytest.raises(ValueError, match=message):
        model.compute_loss(**too_long)
    with pytest.raises(ValueError, match=r"12 positions .* \+ new tokens\) exceed the sliding attention window"):
        model.generate(fits["input_ids"], fits["attention_mask"], max_new_tokens=2, **GENERATION)


def test_learned_positions_must_hold_prompt_and_text():
    base = tiny_base("gpt2")  # 96 learned positions
    model = SoftPromptModel(base, softprompt.PrefixTuningConfig(num_virtual_tokens=90))
    batch = random_batch([6, 3], "left")
    model(**batch)  # 96 positions: fits
    with pytest.raises(ValueError, match=r"A row needs 97 positions .* more than the 96 learned positions of this "
                                         r"GPT-2 model. Fix:"):
        model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=1, **GENERATION)


# ----------------------------------------------------------------------------------------------- what differs


def test_the_family_records_say_what_the_models_do():
    for model_type in FAMILY_MODEL_TYPES:
        family = family_named(model_type)
        base = tiny_base(model_type)
        shape = family.shape(base.config)
        ids = torch.arange(4, 12)
        scale = base.config.hidden_size ** 0.5 if family.embedding_scale == "sqrt_hidden_size" else 1.0
        embeddings = base.get_input_embeddings()
        torch.testing.assert_close(embeddings(ids), embeddings.weight[ids] * scale, rtol=1e-6, atol=0, msg=model_type)
        assert embeddings.weight.shape[1] == shape.embedding_width
        assert base.get_output_embeddings().bias is None, f"{model_type}: the label-only head assumes no bias"
        cache = DynamicCache(config=base.config)
        with torch.no_grad():
            base(input_ids=ids[None], use_cache=True, **cache_argument(base, cache))
        assert tuple(cache.layers[0].keys.shape) == (1, shape.num_key_value_heads, 8, shape.head_dim), model_type
        assert len(cache.layers) == shape.num_layers
        takes_positions = "position_ids" in __import__("inspect").signature(base.get_decoder().forward).parameters
        assert takes_positions == (family.positions == "position_ids"), model_type


@pytest.mark.parametrize("name", sorted({names[0] for names in (
    sorted(family.known_configs) for family in softprompt.families.FAMILIES)}))
def test_parameter_counts_of_a_real_model_of_every_family_equal_pefts(name):
    """Counted on the meta device from the config known offline. The differences: opt-350m's virtual tokens are as
    wide as its 512-wide word embeddings, where PEFT sizes them by the 1024 hidden size (and then fails to run; for
    CPT even with ``token_dim`` set, which its CPT overwrites); PEFT refuses adaption prompt beyond its own table."""
    from softprompt.params import SEED_CONFIGS, base_model_config, meta_base_model, parameter_counts

    config = base_model_config(name)
    for count, seed_config in zip(parameter_counts(config, SEED_CONFIGS), SEED_CONFIGS.values()):
        meta = meta_base_model(config)
        if peft_refusal(seed_config, config.model_type) is not None:
            with pytest.raises(ValueError, match="Unsupported model type for adaption prompt"):
                get_peft_model(meta, peft_config_for(seed_config, meta))
            continue
        expected = get_peft_model(meta, peft_config_for(seed_config, meta)).get_nb_trainable_parameters()
        if name == "facebook/opt-350m" and isinstance(seed_config, softprompt.CPTConfig):
            assert (count.trainable, expected[0]) == (10 * 512, 10 * 1024)  # test_cpt.py: PEFT's fails to run
            continue
        assert (count.trainable, count.total) == expected, (name, count.label)


def test_opt_350m_virtual_tokens_are_as_wide_as_its_embeddings():
    from softprompt.params import base_model_config, meta_base_model, parameter_counts

    config = base_model_config("facebook/opt-350m")
    (count,) = parameter_counts(config, {"prompt tuning, 8 tokens": softprompt.PromptTuningConfig(num_virtual_tokens=8)})
    assert count.trainable == 8 * 512
    peft_default = get_peft_model(meta_base_model(config), peft.PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                                   num_virtual_tokens=8))
    assert peft_default.get_nb_trainable_parameters()[0] == 8 * 1024  # PEFT's hidden-size table: cannot run
    # The tiny OPT of the same layout runs every method (test_every_method_equals_peft), at C = 16 under hidden 32.
    shape = family_named("opt").shape(tiny_base("opt").config)
    assert (shape.embedding_width, shape.hidden_size) == (16, 32)


# ------------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_train_eval_and_generate_commands_run_on_every_family(model_type, tmp_path, capsys):
    """`softprompt train / eval / generate --model DIR` on a local tiny model of the family (with the shipped
    tokenizer), through transformers' from_pretrained."""
    from softprompt.cli import main
    from softprompt.quickstart import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "base", model_type=model_type)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--method", "prefix-tuning", "--split", "train[:20]",
                 "--eval-fraction", "0.2", "--num-epochs", "1", "--num-generations", "0", "--no-progress",
                 "--output-dir", str(run)]) == 0
    recorded = __import__("json").loads((run / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert recorded["model_type"] == model_type and recorded["name_or_path"] == str(model_dir.resolve())
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0  # the base it records, found again
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "Tweet text : late again Label : ",
                 "--max-new-tokens", "3"]) == 0
    assert "[adapter] Tweet text : late again Label : " in capsys.readouterr().out


@pytest.mark.parametrize("name", [sorted(family.known_configs)[0] for family in softprompt.families.FAMILIES])
def test_params_command_counts_a_real_model_of_every_family_offline(name, capsys, monkeypatch):
    from softprompt.cli import main
    from softprompt.params import base_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["params", "--model", name, "--method", "prefix-tuning"]) == 0
    config = base_model_config(name)
    shape = family_named(config.model_type).shape(config)
    assert f"trainable params: {20 * shape.prefix_width:,d} ||" in capsys.readouterr().out
