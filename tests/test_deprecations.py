"""softprompt follows transformers' seams as they move: its own calls raise no deprecation warning, and the test
configuration (``conftest.py``) fails any test in which one of softprompt's calls does."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import softprompt
from softprompt import SoftPromptModel
from softprompt.seams import cache_keyword

from helpers import DeprecatedCallError

CONFIGS = {
    "prompt": softprompt.PromptTuningConfig(num_virtual_tokens=3),
    "p-tuning": softprompt.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix": softprompt.PrefixTuningConfig(num_virtual_tokens=3),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_loss_generate_save_and_load_raise_no_deprecation_warning(method, tiny_bloom, batch, tmp_path):
    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = SoftPromptModel(tiny_bloom, copy.deepcopy(CONFIGS[method]))
        model(**batch).loss.backward()
        model.compute_loss(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        model.compute_loss(**batch, virtual_token_layout="sequence").backward()
        model.generate(**prompt, max_new_tokens=3)
        model.generate(**prompt, max_new_tokens=3, num_beams=2, adapter_names=["default", None, "default"])
        model.save_pretrained(tmp_path / "adapter")
        reloaded = SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "adapter", format="softprompt")
        reloaded(**batch)
        reloaded.generate(**prompt, max_new_tokens=3)
    deprecations = [
        f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert deprecations == []


def test_the_cache_goes_under_the_name_the_installed_forward_takes(tiny_bloom):
    # Whatever the installed transformers calls it, the name is a parameter of the forward: never a guess.
    assert cache_keyword(tiny_bloom) in inspect.signature(tiny_bloom.forward).parameters
    assert cache_keyword(tiny_bloom.get_decoder()) in inspect.signature(tiny_bloom.get_decoder().forward).parameters


def test_a_deprecation_raised_under_softprompts_call_fails_the_test(tiny_bloom, batch):
    """The guard in conftest.py, shown on a base model whose forward warns the way transformers does before a
    rename: called through softprompt, the warning is an error at the call; called by the test itself, only a
    warning."""

    def deprecated_forward(module, args, kwargs):
        warnings.warn("`old_name` is deprecated. Use `new_name` instead.", FutureWarning, stacklevel=2)

    tiny_bloom.register_forward_pre_hook(deprecated_forward, with_kwargs=True)
    model = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(DeprecatedCallError, match=r"softprompt makes at .*softprompt.*`old_name` is deprecated"):
        model(**batch)
    with pytest.warns(FutureWarning, match="old_name"):
        tiny_bloom(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_the_one_format_names_of_earlier_versions_still_work_and_name_their_replacement(tiny_bloom, batch, tmp_path):
    # The README once used these; they now warn (from softprompt's code, so the caller sees the caller's line) and do
    # what the PEFT names do.
    model = SoftPromptModel(tiny_bloom, copy.deepcopy(CONFIGS["prefix"]))
    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    expected = model(**prompt).logits
    with pytest.warns(DeprecationWarning, match=r"save_adapter\(directory\) is deprecated: use save_pretrained"):
        model.save_adapter(tmp_path / "ours")
    with pytest.warns(DeprecationWarning, match=r'save_peft_adapter\(directory\) is deprecated: use save_pretrained\('
                                                r'directory, format="peft"\)'):
        model.save_peft_adapter(tmp_path / "peft")
    with pytest.warns(DeprecationWarning, match=r"from_adapter is deprecated: use SoftPromptModel.from_pretrained"):
        assert torch.equal(SoftPromptModel.from_adapter(tiny_bloom, tmp_path / "ours")(**prompt).logits, expected)
    with pytest.warns(DeprecationWarning, match=r"from_peft_adapter is deprecated"):
        assert torch.equal(SoftPromptModel.from_peft_adapter(tiny_bloom, tmp_path / "peft")(**prompt).logits, expected)
    with pytest.warns(DeprecationWarning, match=r"load_peft_adapter is deprecated"):
        assert torch.equal(softprompt.load_peft_adapter(tiny_bloom, tmp_path / "peft")(**prompt).logits, expected)
