"""The hub through huggingface_hub, without a network: adapters loaded by hub id from huggingface_hub's cache with
``HF_HUB_OFFLINE=1`` (both formats, revisions, subfolders, a base model named by hub id), and ``push_to_hub`` up to
the call into huggingface_hub (the uploaded files and model card).

The cache is built in huggingface_hub's own layout (``models--owner--name/{blobs,refs,snapshots}``, snapshot files
linked to their blobs), and huggingface_hub's ``scan_cache_dir`` must read it back before a test uses it. Offline
mode is on through the variable huggingface_hub reads at import (``constants.HF_HUB_OFFLINE``) as well as the
environment, and any attempt to open a socket fails the test."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

import softprompt
from softprompt import AdapterFormatError, AutoSoftPromptModelForCausalLM, SoftPromptModel
from softprompt.quickstart import save_tiny_bloom

from helpers import FILES, FORMATS, TOLERANCE, assert_same_outputs, commit_to_cache, trained_a_little

ADAPTER_ID = "softprompt-tests/complaints"
BASE_ID = "softprompt-tests/tiny-bloom"




@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; is_offline_mode() returns this module variable.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a socket was opened in offline mode")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.mark.parametrize("config", [softprompt.PromptEncoderConfig(num_virtual_tokens=3),
                                    softprompt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2)],
                         ids=["p-tuning", "adaption-prompt"])
@pytest.mark.parametrize("format", FORMATS)
def test_from_pretrained_loads_a_hub_id_from_the_cache_offline(format, config, offline, tiny_bloom, batch, tmp_path):
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(tiny_bloom, copy.deepcopy(config)), batch)
    model.save_pretrained(tmp_path / "upload", format=format)
    commit_to_cache(tmp_path / "cache", ADAPTER_ID, tmp_path / "upload")
    loaded = SoftPromptModel.from_pretrained(tiny_bloom, ADAPTER_ID, cache_dir=tmp_path / "cache")
    assert_same_outputs(loaded, model, batch)
    loaded.load_adapter(ADAPTER_ID, "again", cache_dir=tmp_path / "cache", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch, adapter_names=["again"] * 3).logits, model(**batch).logits)


def test_the_default_cache_revisions_and_subfolders(offline, monkeypatch, tiny_bloom, batch, tmp_path):
    torch.manual_seed(0)
    first = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2))
    second = SoftPromptModel(tiny_bloom, softprompt.PrefixTuningConfig(num_virtual_tokens=3))
    second.add_adapter("quotes", softprompt.PromptTuningConfig(num_virtual_tokens=4))
    first.save_pretrained(tmp_path / "v1")
    second.save_pretrained(tmp_path / "v2", format="peft")
    cache = tmp_path / "cache"
    old = commit_to_cache(cache, ADAPTER_ID, tmp_path / "v1", refs=("v1",))
    commit_to_cache(cache, ADAPTER_ID, tmp_path / "v2", refs=("main",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets, at import

    with torch.no_grad():
        latest = SoftPromptModel.from_pretrained(tiny_bloom, ADAPTER_ID)  # main
        assert torch.equal(latest(**batch).logits, second(**batch).logits)
        for revision in ("v1", old):  # a tag or branch, or a commit
            loaded = SoftPromptModel.from_pretrained(tiny_bloom, ADAPTER_ID, revision=revision)
            assert torch.equal(loaded(**batch).logits, first(**batch).logits)
        quotes = SoftPromptModel.from_pretrained(tiny_bloom, ADAPTER_ID, adapter_name="quotes", subfolder="quotes")
        second.set_adapter("quotes")
        assert torch.equal(quotes(**batch).logits, second(**batch).logits)


def test_what_is_neither_cached_nor_a_directory_is_explained(offline, tiny_bloom, tmp_path):
    with pytest.raises(AdapterFormatError, match=r"'softprompt-tests/missing' \(revision 'main'\): no local "
                       r"directory of that name, and no snapshot in the hub cache while the hub cannot be used .* "
                       r"Fix: fetch it once with network access \(HF_HUB_OFFLINE unset\), or pass a local directory"):
        SoftPromptModel.from_pretrained(tiny_bloom, "softprompt-tests/missing", cache_dir=tmp_path)
    with pytest.raises(AdapterFormatError, match=r"nowhere/at/all: adapter directory not found \(and '.*' is no hub "
                       r"repository id either\)"):
        SoftPromptModel.from_pretrained(tiny_bloom, tmp_path / "nowhere" / "at" / "all")


@pytest.mark.parametrize("format", FORMATS)
def test_auto_loads_adapter_and_base_by_hub_id_offline(format, offline, tokenizer, batch, tmp_path):
    cache = tmp_path / "cache"
    commit_to_cache(cache, BASE_ID, save_tiny_bloom(tmp_path / "base", tokenizer=tokenizer, seed=5))
    base = AutoModelForCausalLM.from_pretrained(BASE_ID, cache_dir=cache)
    assert base.config._name_or_path == BASE_ID  # what the adapter will record
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(base, softprompt.PrefixTuningConfig(num_virtual_tokens=3)), batch)
    model.save_pretrained(tmp_path / "upload", format=format)
    commit_to_cache(cache, ADAPTER_ID, tmp_path / "upload")
    loaded = AutoSoftPromptModelForCausalLM.from_pretrained(ADAPTER_ID, cache_dir=cache)
    assert loaded.base_model is not base
    assert_same_outputs(loaded, model, batch)


# ------------------------------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def hub_calls(monkeypatch):
    """Replaces HfApi's calls with records of them; upload_folder keeps a copy of every file it was given."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **options}))

    def create_branch(self, repo_id, **options):
        calls.append(("create_branch", {"repo_id": repo_id, **options}))

    def upload_folder(self, *, repo_id, folder_path, **options):
        files = {str(path.relative_to(folder_path)): path.read_bytes() for path in Path(folder_path).rglob("*")
                 if path.is_file()}
        calls.append(("upload_folder", {"repo_id": repo_id, "token": self.token, "files": files, **options}))
        return "commit-info"

    for name, replacement in [("create_repo", create_repo), ("create_branch", create_branch),
                              ("upload_folder", upload_folder)]:
        monkeypatch.setattr(HfApi, name, replacement)
    return calls


@pytest.mark.parametrize("format", FORMATS)
def test_push_to_hub_uploads_the_save_pretrained_folder_and_a_model_card(format, hub_calls, offline, tokenizer, batch,
                                                                         tmp_path):
    cache = tmp_path / "cache"
    commit_to_cache(cache, BASE_ID, save_tiny_bloom(tmp_path / "base", tokenizer=tokenizer, seed=5))
    base = AutoModelForCausalLM.from_pretrained(BASE_ID, cache_dir=cache)
    torch.manual_seed(0)
    model = trained_a_little(SoftPromptModel(base, softprompt.PromptTuningConfig(num_virtual_tokens=5)), batch)
    assert model.push_to_hub(ADAPTER_ID, format=format, private=True, token="hf_token") == "commit-info"

    assert [name for name, _ in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][1] == {"repo_id": ADAPTER_ID, "token": "hf_token", "private": True, "exist_ok": True}
    upload = hub_calls[1][1]
    assert upload["repo_id"] == ADAPTER_ID and upload["token"] == "hf_token" and upload["create_pr"] is False
    saved = model.save_pretrained(tmp_path / "saved", format=format)
    assert sorted(upload["files"]) == sorted(FILES[format] + ["README.md"])
    for name in FILES[format]:  # exactly what save_pretrained writes
        assert upload["files"][name] == (saved / name).read_bytes(), name

    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.base_model == BASE_ID
    assert card.data.library_name == ("peft" if format == "peft" else "softprompt")
    assert card.data.pipeline_tag == "text-generation"
    assert set(card.data.tags) >= {"softprompt", "prompt-tuning", f"base_model:adapter:{BASE_ID}"}
    assert "| `default` | prompt-tuning | 5 | 320 | the top folder |" in card.text
    assert f'AutoSoftPromptModelForCausalLM.from_pretrained("{ADAPTER_ID}")' in card.text
    assert f'SoftPromptModel.from_pretrained(base_model, "{ADAPTER_ID}")' in card.text
    peft_line = (f'PeftModel.from_pretrained(base_model, "{ADAPTER_ID}")' if format == "peft"
                 else 'PeftModel.from_pretrained(base_model, "peft-adapter")')
    assert peft_line in card.text

    # What was uploaded loads back by its id, with softprompt and (PEFT's format) with PEFT.
    uploaded = tmp_path / "uploaded"
    for name, payload in upload["files"].items():
        (uploaded / name).parent.mkdir(parents=True, exist_ok=True)
        (uploaded / name).write_bytes(payload)
    commit_to_cache(cache, ADAPTER_ID, uploaded)
    assert_same_outputs(AutoSoftPromptModelForCausalLM.from_pretrained(ADAPTER_ID, cache_dir=cache), model, batch)
    if format == "peft":
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), uploaded).eval()
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            ours, their_output = model(**batch), theirs(**batch)
        torch.testing.assert_close(ours.logits[real], their_output.logits[:, 5:][real], **TOLERANCE)


def test_push_to_hub_options_and_checks(hub_calls, tiny_bloom):
    model = SoftPromptModel(tiny_bloom, softprompt.PromptTuningConfig(num_virtual_tokens=2))
    model.add_adapter("quotes", softprompt.PrefixTuningConfig(num_virtual_tokens=2))
    for bad, message in [(dict(repo_id="not a repo id"), r"repo_id='not a repo id': expected a hub repository id"),
                         (dict(format="lora"), r"format='lora'"),
                         (dict(selected_adapters=["other"]), r"Unknown adapter name\(s\) \['other'\]")]:
        with pytest.raises(ValueError, match=message):
            model.push_to_hub(**{"repo_id": ADAPTER_ID, **bad})
    assert hub_calls == []  # nothing was sent

    model.push_to_hub(ADAPTER_ID, selected_adapters=["quotes"], revision="experiments", commit_message="Quotes",
                      write_model_card=False)
    assert [name for name, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls[1][1] == {"repo_id": ADAPTER_ID, "branch": "experiments", "exist_ok": True}
    upload = hub_calls[2][1]
    assert upload["revision"] == "experiments" and upload["commit_message"] == "Quotes"
    assert sorted(upload["files"]) == ["quotes/adapter.safetensors", "quotes/adapter_config.json"]
    model.push_to_hub(ADAPTER_ID)
    card = hub_calls[-1][1]["files"]["README.md"].decode()
    assert "a base model whose name was not recorded" in card
    assert "| `quotes` | prefix-tuning | 2 | 256 | `quotes/` |" in card
