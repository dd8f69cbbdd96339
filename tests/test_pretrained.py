"""PEFT's names for saving and loading: ``save_pretrained`` / ``from_pretrained`` / ``load_adapter`` in both formats,
PEFT's layout for several adapters, the one-call `AutoSoftPromptModelForCausalLM`, and errors that say what to do.

References: the model that saved the adapter (bit for bit on CPU: the files hold its exact tensors, or for PEFT's
format its exact output, which then goes through the same operations), and PEFT holding the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import softprompt
from softprompt import (
    AdapterFormatError,
    AutoSoftPromptModelForCausalLM,
    BaseModelMismatchError,
    SoftPromptModel,
)
from softprompt.quickstart import build_tiny_bloom, save_tiny_bloom

from helpers import CONFIGS, FILES, FORMATS, TOLERANCE, VARIANTS, assert_same_outputs, trained_a_little
from peft_reference import peft_twin

@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(variant, format, tiny_bloom, tokenizer, batch,
                                                                     tmp_path):
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(tiny_bloom, copy.deepcopy(CONFIGS[variant]), tokenizer=tokenizer), batch)
    assert model.save_pretrained(tmp_path / "adapter", format=format) == tmp_path / "adapter"
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == FILES[format]
    loaded = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "adapter")
    assert loaded.active_config.num_virtual_tokens == model.active_config.num_virtual_tokens
    assert not any(parameter.requires_grad for parameter in loaded.parameters())  # frozen unless is_trainable (PEFT)
    assert_same_outputs(loaded, model, batch)
    trainable = SoftPromptModel.from_pretrained(tiny_bloom, str(tmp_path / "adapter"), is_trainable=True)
    assert all(parameter.requires_grad for parameter in trainable.prompts.parameters())


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_from_pretrained_reads_a_directory_peft_wrote(variant, tiny_bloom, tokenizer, batch, tmp_path):
    config, make_peft_config = VARIANTS[variant]
    torch.manual_seed(0)
    ours = SoftPromptModel(tiny_bloom, copy.deepcopy(config), tokenizer=tokenizer)
    theirs = peft_twin(ours, tiny_bloom, peft_config=make_peft_config())
    theirs.save_pretrained(tmp_path / "peft")
    ours = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "peft")
    num_virtual = 0 if config.method == "prefix_tuning" else config.num_virtual_tokens
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        our_output, their_output = ours(**batch), theirs(**batch)
    torch.testing.assert_close(our_output.logits[real], their_output.logits[:, num_virtual:][real], **TOLERANCE)
    assert_same_outputs(ours, SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "peft", format="peft"), batch)  # one reader for both names


@pytest.mark.parametrize("format", FORMATS)
def test_several_adapters_are_saved_in_peft_layout_and_load_back(format, tiny_bloom, batch, tmp_path):
    torch.manual_seed(0)
    model = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("quotes", softprompt.PrefixTuningConfig(num_virtual_tokens=3))
    model.save_pretrained(tmp_path / "both", format=format)
    # PEFT's layout: "default" at the top, every other adapter in a subdirectory of its name.
    assert sorted(path.name for path in (tmp_path / "both").iterdir()) == sorted(FILES[format] + ["quotes"])
    assert sorted(path.name for path in (tmp_path / "both" / "quotes").iterdir()) == FILES[format]
    loaded = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "both")
    loaded.load_adapter(tmp_path / "both", "quotes", subfolder="quotes")
    names = ["default", "quotes", "default"]
    with torch.no_grad():
        assert torch.equal(loaded(**batch, adapter_names=names).logits, model(**batch, adapter_names=names).logits)

    model.save_pretrained(tmp_path / "one", selected_adapters=["quotes"], format=format)
    assert sorted(path.name for path in (tmp_path / "one").iterdir()) == ["quotes"]
    with pytest.raises(AdapterFormatError, match=r"no adapter_config.json at the top, but adapters in the "
                       r"subdirectories \['quotes'\].* Fix: pass subfolder='quotes'"):
        SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "one")
    quotes = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "one", adapter_name="quotes", subfolder="quotes")
    with torch.no_grad():
        model.set_adapter("quotes")
        assert torch.equal(quotes(**batch).logits, model(**batch).logits)


def test_load_adapter_reads_either_format_beside_the_loaded_ones(tiny_bloom, batch, tmp_path):
    torch.manual_seed(0)
    first = SoftPromptModel(tiny_bloom, softprompt.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8))
    second = SoftPromptModel(tiny_bloom, softprompt.PrefixTuningConfig(num_virtual_tokens=2))
    first.save_pretrained(tmp_path / "ours")
    second.save_pretrained(tmp_path / "peft", format="peft")
    model = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "ours", adapter_name="first")
    model.load_adapter(tmp_path / "peft", adapter_name="second", is_trainable=True)
    assert all(parameter.requires_grad for parameter in model.prompts["second"].parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch, adapter_names=["second"] * 3).logits, second(**batch).logits)
        assert torch.equal(model(**batch, adapter_names=["first"] * 3).logits, first(**batch).logits)
    # The name is checked before anything is looked for.
    with pytest.raises(ValueError, match=r"adapter_name='second' is already loaded"):
        model.load_adapter(tmp_path / "nowhere", "second")


def test_saving_checks_everything_before_writing(tiny_bloom, tmp_path):
    model = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"format='pef': expected 'softprompt' or 'peft'"):
        model.save_pretrained(tmp_path / "a", format="pef")
    with pytest.raises(ValueError, match=r"Unknown adapter name\(s\) \['other'\]"):
        model.save_pretrained(tmp_path / "a", selected_adapters=["default", "other"])
    with pytest.raises(ValueError, match=r"selected_adapters='default': expected a non-empty list"):
        model.save_pretrained(tmp_path / "a", selected_adapters="default")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"Unknown adapter name\(s\) \['other'\]"):
        model.save_adapter(tmp_path / "a", "other")  # the deprecated one-adapter name checks too
    model.save_pretrained(tmp_path / "a", is_main_process=False)  # the other processes of a distributed run
    assert not (tmp_path / "a").exists()


def test_a_config_of_neither_format_and_a_wrong_base_argument_are_explained(tiny_bloom, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(AdapterFormatError, match=r"neither softprompt's adapter format .* nor PEFT's .* found the keys "
                       r"\['lora_alpha', 'r'\]"):
        SoftPromptModel.from_pretrained(tiny_bloom, tmp_path)
    with pytest.raises(TypeError, match=r"base_model=str: expected a transformers causal LM.*AutoSoftPromptModel"):
        SoftPromptModel.from_pretrained("bigscience/bloomz-560m", tmp_path)
    SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path / "ours")
    with pytest.raises(AdapterFormatError, match=r"It is in softprompt's own format: use SoftPromptModel.from_pretr"):
        SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "ours", format="peft")


# ----------------------------------------------------------------------------------- AutoSoftPromptModelForCausalLM


@pytest.fixture
def saved_base(tokenizer, tmp_path):
    """A tiny BLOOM saved on disk, loaded back: its config records where it came from, as a hub model's does."""
    directory = save_tiny_bloom(tmp_path / "base", tokenizer=tokenizer, model=build_tiny_bloom(len(tokenizer), seed=3))
    return AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("format", FORMATS)
def test_auto_loads_the_recorded_base_then_the_adapter(format, saved_base, tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(saved_base, softprompt.PromptEncoderConfig(num_virtual_tokens=4)), batch)
    model.save_pretrained(tmp_path / "adapter", format=format)
    loaded = AutoSoftPromptModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    assert loaded.base_model is not saved_base
    assert loaded.base_model.config._name_or_path == str(tmp_path / "base")
    assert_same_outputs(loaded, model, batch)


def test_auto_explains_a_missing_an_unreachable_and_a_changed_base(saved_base, tiny_bloom, tokenizer, tmp_path):
    in_memory = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2))
    in_memory.save_pretrained(tmp_path / "memory")
    fix = r"Fix: load the base yourself and pass it: SoftPromptModel.from_pretrained\(AutoModelForCausalLM"
    with pytest.raises(AdapterFormatError, match=r"the adapter records no base model .*" + fix):
        AutoSoftPromptModelForCausalLM.from_pretrained(tmp_path / "memory")

    SoftPromptModel(saved_base, softprompt.PrefixTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path / "a")
    save_tiny_bloom(tmp_path / "base", tokenizer=tokenizer, model=build_tiny_bloom(len(tokenizer), hidden_size=32))
    with pytest.raises(BaseModelMismatchError, match=r"the base model the adapter records, '.*base', was loaded "
                       r"but has another shape than the adapter: hidden_size 64 \(adapter\) vs 32 \(base model\).*" + fix):
        AutoSoftPromptModelForCausalLM.from_pretrained(tmp_path / "a")

    config_path = tmp_path / "a" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document["base_model"]["name_or_path"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(document))
    with pytest.raises(AdapterFormatError, match=r"the base model the adapter records, '.*moved-away', could not be "
                       r"loaded \(.*\)\. " + fix):
        AutoSoftPromptModelForCausalLM.from_pretrained(tmp_path / "a")
    with pytest.raises(TypeError, match="is not instantiated"):
        AutoSoftPromptModelForCausalLM()


@pytest.mark.parametrize("format", FORMATS)
def test_the_same_adapter_is_saved_as_the_same_bytes(format, tiny_bloom, tmp_path):
    """So that pushing an unchanged adapter changes nothing on the hub (safetensors orders several metadata entries
    differently from one save to the next: softprompt writes one)."""
    model = SoftPromptModel(tiny_bloom, softprompt.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8))
    for attempt in range(3):
        model.save_pretrained(tmp_path / str(attempt), format=format)
    for name in FILES[format]:
        assert len({(tmp_path / str(attempt) / name).read_bytes() for attempt in range(3)}) == 1, name
