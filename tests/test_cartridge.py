"""Cartridges (``softprompt/methods/cartridge.py``): against PEFT with the same weights on every family, each row of
a mixed batch as alone, initialization from a text's prefill against the base model with the text in front,
gradient checkpointing, the frozen first positions, both formats, composition and the command line.

Shapes: B batch, T tokens, P cartridge positions, F frozen positions, V vocab.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.cartridge.utils import (
    compose_cartridge_adapters as peft_compose,
    initialize_kv_prefix_from_text as peft_initialize_from_text,
    prompt_embeddings_from_past_key_values,
)
from safetensors.torch import load_file
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

import softprompt
from softprompt import CartridgeConfig, SoftPromptModel
from softprompt.cartridges import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
)
from softprompt.cli import main
from softprompt.methods.cartridge import init_token_ids, table_from_past_key_values, table_from_text
from softprompt.multi_task import make_trainable
from softprompt.quickstart import build_tiny_model
from softprompt.seams import cache_argument, enable_activation_checkpointing

from helpers import FAMILY_MODEL_TYPES, assert_each_row_computes_what_it_computes_alone, greedy_by_forward, random_batch
from peft_reference import peft_config_for, peft_twin

# fp32 on CPU, same weights: only the summation order differs (cache concatenation, batch size), a few ulps of
# logits of order 1-10 (measured 0.0 against PEFT on every family).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB_SIZE = 300
PAD_ID = 3
GENERATION = dict(eos_token_id=None, pad_token_id=PAD_ID)
CONFIG = CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=1)
INIT_TEXT = "Tweet text : the crew was lovely and kind today , thanks for a calm flight"


def prompt_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in ("input_ids", "attention_mask")}


def test_config_is_checked_with_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"num_frozen_tokens=-1 with num_virtual_tokens=4: expected an int from 0 to 4"):
        CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=-1)
    with pytest.raises(ValueError, match=r"num_frozen_tokens=5 with num_virtual_tokens=4: expected an int from 0 to 4"):
        CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=5)
    with pytest.raises(ValueError, match=r"num_frozen_tokens=True .*Fix: pass num_frozen_tokens=1"):
        CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=True)
    with pytest.raises(ValueError, match=r"num_virtual_tokens=None: expected a positive int"):
        CartridgeConfig()
    with pytest.raises(ValueError, match=r"init_text='  ': expected a non-empty text"):
        CartridgeConfig(num_virtual_tokens=4, init_text="  ")
    assert CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=4).num_frozen_tokens == 4  # 0 trainable: allowed


# ------------------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_cartridge_equals_peft_on_every_family(model_type):
    """PEFT 0.21.2 runs its Cartridge on every family softprompt supports: loss, real-position logits and gradients
    on a right-padded batch, and greedy ids (PEFT's forward token by token: its generate drops the cartridge on
    transformers 5.24+)."""
    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    ours = SoftPromptModel(base, copy.deepcopy(CONFIG))
    theirs = peft_twin(ours, base)
    batch = random_batch([7, 4], "right")
    our_output, their_output = ours(**batch), theirs(**batch)
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(our_output.logits[real], their_output.logits[real], **TOLERANCE)
    for layout in ("prefix", "sequence"):
        torch.testing.assert_close(ours.compute_loss(**batch, virtual_token_layout=layout), their_output.loss,
                                   **TOLERANCE, msg=layout)
    our_output.loss.backward()
    their_output.loss.backward()
    module = ours.prompts["default"]
    their_parameters = dict(theirs.named_parameters())
    assert module.trainable_embedding.grad.abs().sum() > 0
    torch.testing.assert_close(module.trainable_embedding.grad,
                               their_parameters["prompt_encoder.default.trainable_embedding"].grad, **TOLERANCE)
    assert module.frozen_embedding.grad is None
    assert their_parameters["prompt_encoder.default.frozen_embedding"].grad is None
    prompt = {key: value[:1] for key, value in prompt_of(batch).items()}  # the unpadded row
    our_ids = ours.generate(**prompt, max_new_tokens=5, do_sample=False, **GENERATION)
    assert torch.equal(our_ids, greedy_by_forward(theirs, **prompt, max_new_tokens=5))


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_fresh_cartridge_counts_pefts_parameters(model_type):
    """The frozen first position counts in all params, not in the trainable ones, as in PEFT."""
    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
    for config in (CartridgeConfig(num_virtual_tokens=5), CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=0),
                   CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=5)):
        ours = SoftPromptModel(base, copy.deepcopy(config))
        theirs = get_peft_model(copy.deepcopy(base), peft_config_for(config))
        assert ours.num_parameters() == theirs.get_nb_trainable_parameters(), config
        width = ours.shape.prefix_width
        assert ours.num_parameters()[0] == (5 - config.num_frozen_tokens) * width


@pytest.mark.parametrize("model_type", ["bloom", "llama", "gpt2"])
def test_the_peft_export_loads_in_peft_with_the_same_logits(model_type, tmp_path):
    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    ours = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=2))
    ours.save_pretrained(tmp_path / "ours", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    batch = random_batch([6, 6], "right")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, **TOLERANCE)
    stored = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    module = ours.prompts["default"]
    assert torch.equal(stored["prompt_embeddings"], torch.cat([module.frozen_embedding, module.trainable_embedding]))
    # The config as PEFT writes it, field for field (PEFT adds its own version, which softprompt does not claim).
    peft_written = get_peft_model(copy.deepcopy(base), peft_config_for(ours.active_config))
    peft_written.save_pretrained(tmp_path / "peft")
    document = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    document.pop("peft_version")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == document
    # ...and what PEFT saves loads here: its weight, split by its frozen count.
    loaded = SoftPromptModel.from_pretrained(base, tmp_path / "peft").prompts["default"]
    assert loaded.config.num_frozen_tokens == 2
    assert torch.equal(loaded(), peft_written.prompt_encoder["default"].weight)


# ------------------------------------------------------------------------------------------ each row as alone

MIXED_ROWS = [("cartridge", 7), ("prompt", 6), (None, 5), ("prefix", 4), ("cartridge", 3)]
MIXED_ADAPTERS = {
    "cartridge": CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=1),
    "prompt": softprompt.PromptTuningConfig(num_virtual_tokens=3),
    "prefix": softprompt.PrefixTuningConfig(num_virtual_tokens=2),
}


@pytest.mark.parametrize("model_type", ["bloom", "llama", "gpt2", "gemma2"])
def test_a_left_padded_mixed_batch_gives_every_row_what_it_gives_alone(model_type):
    """A cartridge beside prompt tuning, prefix tuning and the base model, on ALiBi, grouped-query rotary, learned
    positions and sliding windows with soft-capping. (PEFT runs cartridges on every family, checked above; a mixed
    batch is PEFT-free and takes the engine's one key/value path, which tests/test_families.py runs on every family
    with prefix tuning.)"""
    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    model = SoftPromptModel(base, copy.deepcopy(MIXED_ADAPTERS["cartridge"]), adapter_name="cartridge")
    for name in ("prompt", "prefix"):
        model.add_adapter(name, copy.deepcopy(MIXED_ADAPTERS[name]))
    batch = random_batch([n for _, n in MIXED_ROWS], "left")
    assert_each_row_computes_what_it_computes_alone(model, batch, MIXED_ROWS, GENERATION, tolerance=TOLERANCE)
    assert not model.prompts["cartridge"].frozen_embedding.requires_grad  # make_trainable leaves the sink frozen


# ------------------------------------------------------------------------------------- initialization from a text


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_a_cartridge_from_a_texts_prefill_continues_the_text_as_the_base_model_does(model_type, tokenizer):
    """Before any training, a cartridge initialized from a text's first P tokens is those tokens in context: the
    logits and greedy ids after it are the base model's with the P tokens in front of the input."""
    base = build_tiny_model(model_type, len(tokenizer), seed=0)
    config = CartridgeConfig(num_virtual_tokens=6, init_text=INIT_TEXT)
    model = SoftPromptModel(base, config, tokenizer=tokenizer)
    text_ids = torch.tensor([tokenizer(INIT_TEXT)["input_ids"][:6]])  # no chat template: plain tokens (PEFT's rule)
    input_ids = torch.tensor([tokenizer("and the food was good")["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids).logits
        theirs = base(torch.cat([text_ids, input_ids], dim=1)).logits[:, 6:]
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    our_ids = model.generate(input_ids, max_new_tokens=6, do_sample=False, **GENERATION)
    their_ids = base.generate(torch.cat([text_ids, input_ids], dim=1), max_new_tokens=6, do_sample=False,
                              **GENERATION)
    assert torch.equal(our_ids[:, input_ids.shape[1]:], their_ids[:, text_ids.shape[1] + input_ids.shape[1]:])


@pytest.mark.parametrize("chat_template", [False, True], ids=["plain", "chat-template"])
def test_text_init_equals_pefts_initialize_kv_prefix_from_text(chat_template, tokenizer):
    """Same ids (the text as a system message where the tokenizer has a chat template, else plain) and the same
    cached keys and values; also through PEFT's function names on a `SoftPromptModel`."""
    tokenizer = copy.deepcopy(tokenizer)
    if chat_template:
        tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }}</s>{% endfor %}"
    base = build_tiny_model("llama", len(tokenizer), seed=0)
    ours = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=5, init_text=INIT_TEXT), tokenizer=tokenizer)
    theirs = get_peft_model(copy.deepcopy(base), peft_config_for(CartridgeConfig(num_virtual_tokens=5)))
    their_table = peft_initialize_from_text(theirs, tokenizer, text=INIT_TEXT)
    torch.testing.assert_close(ours.prompts["default"](), their_table, **TOLERANCE)
    ids = init_token_ids(tokenizer, INIT_TEXT)
    assert (ids[:2] == tokenizer("<s>system")["input_ids"][:2]) == chat_template
    later = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=5))
    table = initialize_kv_prefix_from_text(later, tokenizer, text=INIT_TEXT)
    assert torch.equal(later.prompts["default"](), table)
    torch.testing.assert_close(table, their_table, **TOLERANCE)


def test_init_from_past_key_values_equals_pefts(tokenizer):
    base = build_tiny_model("qwen3", len(tokenizer), seed=0)
    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(torch.tensor([tokenizer(INIT_TEXT)["input_ids"]]), use_cache=True, **cache_argument(base, cache))
    model = SoftPromptModel(base, softprompt.PrefixTuningConfig(num_virtual_tokens=4))  # prefix tables too, as PEFT
    table = initialize_kv_prefix_from_past_key_values(model, past_key_values=cache)
    assert torch.equal(table, prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=4))
    assert torch.equal(model.prompts["default"].embedding.weight, table)
    with pytest.raises(ValueError, match=r"init_text gives 3 tokens: a cartridge of num_virtual_tokens=50 starts from"):
        table_from_text(base, tokenizer, "short", num_virtual_tokens=50)
    with pytest.raises(ValueError, match=r"The cache holds 20 positions: a cartridge of num_virtual_tokens=50 needs at least"):
        table_from_past_key_values(cache, 50)
    projected = SoftPromptModel(base, softprompt.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True))
    with pytest.raises(ValueError, match=r"expected a cartridge or prefix tuning without projection"):
        initialize_kv_prefix_from_past_key_values(projected, past_key_values=cache)
    with pytest.raises(ValueError, match=r"needs a tokenizer, got tokenizer=None"):
        SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=4, init_text=INIT_TEXT))


# ----------------------------------------------------------------------- frozen positions, gradient checkpointing


def test_frozen_positions_stay_frozen_whoever_switches_the_adapter(tmp_path):
    base = build_tiny_model("llama", VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    model = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=2))
    model.add_adapter("other", CartridgeConfig(num_virtual_tokens=3))
    width = model.shape.prefix_width
    module = model.prompts["default"]
    sink = module.frozen_embedding.detach().clone()
    model.set_adapter("other")
    model.set_adapter("default")  # PEFT's rule: the active adapter becomes trainable...
    make_trainable(model, ["default", "other"])
    assert not module.frozen_embedding.requires_grad and module.trainable_embedding.requires_grad  # ...its sink not
    assert model.num_parameters()[0] == 3 * width + 2 * width
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "loaded", is_trainable=True)
    loaded = SoftPromptModel.from_pretrained(base, tmp_path, is_trainable=True).prompts["default"]
    for other in (model.prompts["loaded"], loaded):
        assert not other.frozen_embedding.requires_grad and other.trainable_embedding.requires_grad
    module.frozen_embedding.requires_grad_(True)  # even set by hand, no gradient reaches the frozen rows
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = random_batch([6, 4], "right")
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch, adapter_names=["default", "default"]).loss.backward()
        optimizer.step()
    assert module.frozen_embedding.grad is None and torch.equal(module.frozen_embedding, sink)
    assert module.trainable_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("model_type", ["bloom", "llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_where_peft_refuses(model_type):
    base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    plain = SoftPromptModel(base, copy.deepcopy(CONFIG)).train()
    checkpointed_base = copy.deepcopy(base)
    enable_activation_checkpointing(checkpointed_base)
    with pytest.raises(ValueError, match="CARTRIDGE does not work with gradient checkpointing"):
        get_peft_model(copy.deepcopy(checkpointed_base), peft_config_for(CONFIG))
    checkpointed = SoftPromptModel.from_module(checkpointed_base, copy.deepcopy(CONFIG),
                                               copy.deepcopy(plain.prompts["default"])).train()
    layer = next(module for module in checkpointed_base.modules() if hasattr(module, "_can_checkpoint_with_cache"))
    first_linear = next(module for module in layer.modules() if isinstance(module, torch.nn.Linear | Conv1D))
    recomputed = []  # a linear layer inside the first layer: recomputation runs it again (the layer's hooks once)
    first_linear.register_forward_pre_hook(lambda module, args: recomputed.append(module))
    batch = random_batch([7, 5], "right")
    for layout in ("prefix", "sequence"):
        losses, gradients = [], []
        for model in (plain, checkpointed):
            model.zero_grad()
            loss = model.compute_loss(**batch, virtual_token_layout=layout)
            loss.backward()
            losses.append(loss)
            gradients.append(model.prompts["default"].trainable_embedding.grad.clone())
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        torch.testing.assert_close(gradients[1], gradients[0], rtol=0, atol=0)
    assert len(recomputed) == 4  # the first layer ran twice per loss: forward and recomputation


# ------------------------------------------------------------------------------------------- formats, composition


@pytest.mark.parametrize("num_frozen_tokens", [0, 2, 5])
@pytest.mark.parametrize("format", ["softprompt", "peft"])
def test_both_formats_round_trip(format, num_frozen_tokens, tmp_path):
    base = build_tiny_model("gemma2", VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    model = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=num_frozen_tokens))
    model.save_pretrained(tmp_path, format=format)
    loaded = SoftPromptModel.from_pretrained(base, tmp_path)
    assert loaded.active_config.num_frozen_tokens == num_frozen_tokens
    assert loaded.prompts["default"].state_dict().keys() == model.prompts["default"].state_dict().keys()
    for key, value in model.prompts["default"].state_dict().items():
        assert torch.equal(loaded.prompts["default"].state_dict()[key], value), key
    batch = random_batch([6, 3], "left")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded.num_parameters() == (0, model.num_parameters()[1])  # loaded frozen unless is_trainable


@pytest.mark.parametrize("format", ["softprompt", "peft"])
def test_composed_cartridges_equal_pefts_composition(format, tmp_path):
    """Concatenated in order, the first cartridge's frozen count; PEFT composes PEFT files, softprompt either."""
    base = build_tiny_model("mistral", VOCAB_SIZE, seed=0)
    torch.manual_seed(1)
    model = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=3, num_frozen_tokens=1), adapter_name="a")
    model.add_adapter("b", CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=2))
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / f"{name}-peft", selected_adapters=[name], format="peft")
        model.save_pretrained(tmp_path / f"{name}-ours", selected_adapters=[name], format=format)
    peft_compose([tmp_path / "a-peft" / "a", tmp_path / "b-peft" / "b"], output_path=tmp_path / "peft-composed")
    compose_cartridge_adapters(base, [tmp_path / "a-ours" / "a", tmp_path / "b-ours" / "b"],
                               output_path=tmp_path / "composed", format=format)
    composed = SoftPromptModel.from_pretrained(base, tmp_path / "composed")
    assert (composed.active_config.num_virtual_tokens, composed.active_config.num_frozen_tokens) == (7, 1)
    expected = torch.cat([model.prompts["a"](), model.prompts["b"]()]).detach()
    assert torch.equal(composed.prompts["default"]().detach(), expected)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft-composed").eval()
    batch = random_batch([6, 6], "right")
    with torch.no_grad():
        torch.testing.assert_close(composed(**batch).logits, theirs(**batch).logits, **TOLERANCE)
    with pytest.raises(ValueError, match=r"expected two or more cartridge directories"):
        compose_cartridge_adapters(base, [tmp_path / "composed"], output_path=tmp_path / "x")


# ------------------------------------------------------------------------------------------------ command line


def test_training_a_cartridge_from_the_command_line_on_the_embedded_default(tmp_path, tokenizer):
    """`--method cartridge` with its fields as flags; `--init-text` starts the cache from the text's prefill, and its
    frozen first position is still that prefill after training."""
    run = tmp_path / "run"
    arguments = ["train", "--split", "train[:60]", "--num-generations", "0", "--no-progress", "--method", "cartridge",
                 "--num-virtual-tokens", "6", "--num-frozen-tokens", "2", "--init-text", INIT_TEXT,
                 "--num-epochs", "3", "--output-dir", str(run)]
    assert main(arguments) == 0
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in evaluations if record["event"] == "eval"]
    assert evaluations[-1]["loss"] < evaluations[0]["loss"]
    trained = SoftPromptModel.from_pretrained(softprompt.AutoSoftPromptModelForCausalLM.from_pretrained(
        run / "adapter").base_model, run / "adapter")
    assert trained.active_config == CartridgeConfig(num_virtual_tokens=6, num_frozen_tokens=2, init_text=INIT_TEXT)
    start = table_from_text(trained.base_model, tokenizer, INIT_TEXT, 6)
    module = trained.prompts["default"]
    torch.testing.assert_close(module.frozen_embedding, start[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(module.trainable_embedding, start[2:])
