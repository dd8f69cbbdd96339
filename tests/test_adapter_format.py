"""softprompt's adapter format and PEFT's: bit-exact round trips, interop with PEFT, and clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

import softprompt
from softprompt import AdapterFormatError, SoftPromptModel
from softprompt.pretrained import read_adapter
from softprompt.methods import MaterializedPrompt
from softprompt.quickstart import build_tiny_bloom

from helpers import CONFIGS, TOLERANCE, VARIANTS, greedy_by_forward, trained_a_little
from peft_reference import peft_twin

@pytest.mark.parametrize("variant", list(CONFIGS))
def test_save_then_load_is_bit_exact(variant, tiny_bloom, tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(tiny_bloom, copy.deepcopy(CONFIGS[variant]), tokenizer=tokenizer), batch)
    model.save_pretrained(tmp_path / "adapter")
    loaded = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "adapter", is_trainable=True, format="softprompt")
    assert loaded.active_config == model.active_config
    saved_state, loaded_state = model.prompts.state_dict(), loaded.prompts.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for key in saved_state:
        assert torch.equal(saved_state[key], loaded_state[key]), key
    assert all(p.requires_grad for p in loaded.prompts.parameters())
    assert not any(p.requires_grad for p in SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "adapter", format="softprompt").parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    # Inference needs no encoder: the stored output alone gives the same logits. Bit for bit (rtol=0, atol=0): the
    # stored table holds the encoder's output exactly, and the base model then runs the same operations on it.
    config, materialized = read_adapter(tmp_path / "adapter", tiny_bloom, materialized_only=True)
    assert isinstance(materialized, MaterializedPrompt)
    only_output = SoftPromptModel.from_module(tiny_bloom, config, materialized, "default")
    with torch.no_grad():
        torch.testing.assert_close(only_output(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_adapter_files_are_safetensors_and_documented_json(tiny_bloom, tmp_path):
    model = SoftPromptModel(tiny_bloom, softprompt.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8))
    model.save_pretrained(tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["format"] == "softprompt-adapter" and document["format_version"] == 1
    assert document["method"] == "p_tuning" and document["library_version"] == softprompt.__version__
    assert document["config"]["encoder_hidden_size"] == 8
    assert document["base_model"]["hidden_size"] == 32 and document["base_model"]["num_layers"] == 2
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter.safetensors", "pt") as file:
        names = set(file.keys())
    assert "materialized" in names and "prompt.mlp_head.0.weight" in names  # the encoder is kept for resuming
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_export_to_peft_loads_in_peft_with_equal_outputs(variant, tiny_bloom, tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(tiny_bloom, copy.deepcopy(CONFIGS[variant]), tokenizer=tokenizer), batch)
    model.save_pretrained(tmp_path / "peft", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_bloom), tmp_path / "peft").eval()
    num_virtual = 0 if model.active_config.method == "prefix_tuning" else model.active_config.num_virtual_tokens
    with torch.no_grad():
        ours, their_output = model(**batch), theirs(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.loss, their_output.loss, **TOLERANCE)
    torch.testing.assert_close(ours.logits[real], their_output.logits[:, num_virtual:][real], **TOLERANCE)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_import_from_peft_equals_peft(variant, tiny_bloom, tokenizer, batch, tmp_path):
    config, make_peft_config = VARIANTS[variant]
    torch.manual_seed(0)
    theirs = peft_twin(SoftPromptModel(tiny_bloom, copy.deepcopy(config), tokenizer=tokenizer), tiny_bloom,
                       peft_config=make_peft_config())
    theirs.save_pretrained(tmp_path / "peft")  # PEFT stores only the encoder's output
    ours = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "peft", format="peft")
    assert ours.active_config.num_virtual_tokens == config.num_virtual_tokens
    with torch.no_grad():
        our_output, their_output = ours(**batch), theirs(**batch)
    num_virtual = 0 if config.method == "prefix_tuning" else config.num_virtual_tokens
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(our_output.loss, their_output.loss, **TOLERANCE)
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, num_virtual:][real], **TOLERANCE)
    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    # PEFT 0.21's generate breaks on transformers 5.24: its forward, run token by token, is the greedy reference.
    assert torch.equal(ours.generate(**prompt, max_new_tokens=10, eos_token_id=None),
                       greedy_by_forward(theirs, **prompt, max_new_tokens=10))


def test_several_adapters_share_one_frozen_base(tiny_bloom, batch, tmp_path):
    torch.manual_seed(0)
    first = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=4))
    second = SoftPromptModel(tiny_bloom, softprompt.PrefixTuningConfig(num_virtual_tokens=3))
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    model = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "first", adapter_name="first", is_trainable=True, format="softprompt")
    model.load_adapter(tmp_path / "second", "second", is_trainable=True)
    base_parameters = sum(p.numel() for p in tiny_bloom.parameters())
    assert model.num_parameters()[1] == base_parameters + 4 * 32 + 3 * 2 * 2 * 32  # the base counted once
    assert model.active_adapter == "first"
    model.set_adapter("second")
    assert model.active_adapter == "second"
    assert not any(p.requires_grad for p in model.prompts["first"].parameters())
    assert all(p.requires_grad for p in model.prompts["second"].parameters())
    # Bit for bit (rtol=0, atol=0): the same weights through the same operations; another adapter loaded beside an
    # adapter must not change a single one of its numbers.
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, second(**batch).logits, rtol=0, atol=0)
        model.set_adapter("first")
        torch.testing.assert_close(model(**batch).logits, first(**batch).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Unknown adapter name\(s\) \['third'\]: loaded adapters are \['first', 'second'\]"):
        model.set_adapter("third")
    with pytest.raises(ValueError, match="already loaded"):
        model.load_adapter(tmp_path / "second", "second")


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tiny_bloom, tmp_path):
    SoftPromptModel(tiny_bloom, softprompt.PrefixTuningConfig(num_virtual_tokens=3)).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_adapter_for_another_base_shape_is_refused(saved):
    other = build_tiny_bloom(300, hidden_size=48, n_layer=3, n_head=4)
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: adapter made for another base model shape: "
                       r"hidden_size 32 \(adapter\) vs 48 \(base model\); num_layers 2 \(adapter\) vs 3"):
        SoftPromptModel.from_pretrained(other, saved, format="softprompt")


def test_weights_file_outside_the_adapter_directory_is_refused(saved, tiny_bloom):
    config_path = saved / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document["weights"]["file"] = "../elsewhere.safetensors"
    config_path.write_text(json.dumps(document))
    with pytest.raises(AdapterFormatError, match=r"weights file '\.\./elsewhere\.safetensors': expected a file name"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")


def test_truncated_safetensors_is_refused(saved, tiny_bloom):
    weights = saved / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match=r"adapter.safetensors: 100 bytes, but the adapter config records \d+: the file is truncated"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")


def test_truncated_safetensors_without_recorded_size_is_refused(saved, tiny_bloom):
    # A record without size and hash would let a truncated or replaced file through unchecked: it is refused
    # itself, whatever the weights file holds.
    document = json.loads((saved / "adapter_config.json").read_text())
    document["weights"] = {"file": "adapter.safetensors"}
    (saved / "adapter_config.json").write_text(json.dumps(document))
    weights = saved / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(AdapterFormatError, match=r"lacks a valid size \('bytes'.*and SHA-256 .*Fix: re-save"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")


def test_corrupt_safetensors_of_the_same_size_is_refused(saved, tiny_bloom):
    weights = saved / "adapter.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0xFF
    weights.write_bytes(bytes(payload))
    with pytest.raises(AdapterFormatError, match="SHA-256 differs"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")


def test_missing_files_are_named(saved, tiny_bloom, tmp_path):
    with pytest.raises(AdapterFormatError, match=r"nowhere: adapter directory not found"):
        SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "nowhere", format="softprompt")
    (saved / "adapter.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match=r"a/adapter.safetensors: file not found"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match=r"a/adapter_config.json: file not found"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")


def test_unknown_method_and_corrupt_json_are_refused(saved, tiny_bloom):
    document = json.loads((saved / "adapter_config.json").read_text())
    document["method"] = "lora"
    (saved / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(AdapterFormatError, match=r"unknown method 'lora': expected one of \['cartridge', 'p_tuning', 'prefix_tuning', 'prompt_tuning'\]"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")
    (saved / "adapter_config.json").write_text('{"format": "softprompt-adap')
    with pytest.raises(AdapterFormatError, match="adapter_config.json: not valid JSON"):
        SoftPromptModel.from_pretrained(tiny_bloom, saved, format="softprompt")


def test_peft_directory_given_to_our_loader_gets_a_hint(tiny_bloom, tmp_path):
    SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path, format="peft")
    with pytest.raises(AdapterFormatError, match="looks like a PEFT adapter: use SoftPromptModel.from_pretrained"):
        SoftPromptModel.from_pretrained(tiny_bloom, tmp_path, format="softprompt")


def test_peft_adapter_for_another_base_is_refused(tiny_bloom, tmp_path):
    SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path, format="peft")
    message = (r"adapter made for another base model shape: hidden_size 32 \(adapter\) vs 48 \(base model\)\. "
               r"Its base model's name was not recorded\. Fix: load it onto a base model of the adapter's shape")
    with pytest.raises(AdapterFormatError, match=message):
        SoftPromptModel.from_pretrained(build_tiny_bloom(300, hidden_size=48, n_layer=2, n_head=4), tmp_path, format="peft")


def test_saving_replaces_files_atomically_and_leaves_no_temporaries(tiny_bloom, tmp_path):
    model = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        model.prompts["default"].embedding.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    loaded = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path, format="softprompt")
    assert torch.equal(loaded.prompts["default"].embedding.weight, model.prompts["default"].embedding.weight)


def test_saved_files_get_ordinary_permissions(tiny_bloom, tmp_path):
    import os
    import stat

    SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
