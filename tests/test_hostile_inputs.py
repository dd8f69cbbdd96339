"""The second catalogue: careless and hostile inputs on the newer surfaces (PEFT-format reads, hub ids and their
subfolders, adapter names, real tokenizers' special tokens, the operating system, interruptions).

Each case works in a copy of one finished run and must raise its message while the folder's every file keeps its
size and SHA-256 (`catalogue.run_case`); a path that would leave the folder it names is pointed back inside the case's
folder, so that the snapshot would see anything written there. Every case failed on the code before this catalogue
(commit 28bf034: a silent load, a write outside the folder, a raw traceback, or a message that named neither the
cause nor the fix), except two that the persistence's consolidation just before had already mended (checked against
93978b2: ``set_adapter(None)`` was accepted and broke ``save_pretrained`` with ``KeyError: None``; a ``peft_type`` list
was a ``TypeError: unhashable type``), and the 3 GB file, refused there with the same message after reading it whole:
`test_the_size_is_checked_before_the_data_is_read` holds that one to a second and no memory.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save as safetensors_save

from softprompt import AdapterFormatError, PrefixTuningConfig, PromptTuningConfig, SoftPromptModel
from softprompt.data import DataError

from catalogue import RUN_FLAGS, Catalogue, CommandFailed, Env, cli, edit_json, run_case, train_cli
from helpers import commit_to_cache

catalogue = Catalogue()
case = catalogue.case
CASES = catalogue.cases
HUB_ID = "someone/complaints"


def offline_cache(env: Env) -> Path:
    """The run's adapter in a huggingface_hub cache under the case's folder, as the hub id `HUB_ID`; offline."""
    cache = env.root / "hub-cache"
    commit_to_cache(cache, HUB_ID, env.adapter)
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def from_hub(env: Env, **options) -> None:
    SoftPromptModel.from_pretrained(env.base, HUB_ID, cache_dir=env.root / "hub-cache", **options)


# ------------------------------------------------------------------------------------------------ paths that escape

for id, options, message in [
    ("a subfolder that climbs out of the snapshot", {"subfolder": "../../../run/adapter"},
     r"subfolder='\.\./\.\./\.\./run/adapter': expected a relative path inside the adapter directory or repository"),
    ("an absolute subfolder", {"subfolder": "/tmp"}, r"subfolder='/tmp': expected a relative path inside"),
    ("a revision that climbs out of the cache's refs", {"revision": "../../refs/main"},
     r"revision='\.\./\.\./refs/main': expected a branch, tag or commit"),
]:
    @case(f"hub: {id}", AdapterFormatError, message, prepare=offline_cache)
    def _(env, options=options):
        from_hub(env, **options)


@case("directory: a subfolder that climbs out of the adapter directory", AdapterFormatError,
      r"subfolder='\.\./adapter': expected a relative path inside")
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.run / "checkpoints", subfolder="../adapter")


for name in ["/absolute/adapter", "a/b", "..", "two words", "line\nbreak", "", "-starts-like-a-flag", "x" * 65]:
    @case(f"adapter name {name[:20]!r}", ValueError, r"adapter_name='.*': expected 1 to 64 letters, digits, '_' or '-'")
    def _(env, name=name):
        model = SoftPromptModel(env.base, PromptTuningConfig(num_virtual_tokens=2))
        # An absolute name is pointed into the case's folder: were it accepted, the snapshot would see the write.
        model.add_adapter(str(env.root / "escaped") if name.startswith("/") else name,
                          PromptTuningConfig(num_virtual_tokens=2))
        model.save_pretrained(env.root / "saved")


@case("load_adapter under a name that leaves the save directory", ValueError,
      r"adapter_name='\.\./escaped': expected 1 to 64 letters")
def _(env):
    model = SoftPromptModel.from_pretrained(env.base, env.adapter)
    model.load_adapter(env.adapter, "../escaped")
    model.save_pretrained(env.root / "saved")


@case("an empty model id (loaded the current folder's adapter)", AdapterFormatError,
      r"model_id='': expected an adapter directory or a hub repository id.*use '\.' for the current folder")
def _(env):
    env.monkeypatch.chdir(env.adapter)
    SoftPromptModel.from_pretrained(env.base, "")


@case("a local folder that hides a cached hub id of the same name", AdapterFormatError,
      r"someone/complaints: a local folder without an adapter hides the hub repository 'someone/complaints'",
      prepare=lambda env: (offline_cache(env), (env.root / HUB_ID).mkdir(parents=True)))
def _(env):
    from_hub(env)


@case("the weights file given instead of its folder", AdapterFormatError,
      r"adapter\.safetensors: a file of an adapter: expected the adapter's directory\. Fix: pass '.*/run/adapter'")
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.adapter / "adapter.safetensors")


@case("set_adapter(None)", ValueError, r"Unknown adapter name\(s\) \[None\]: loaded adapters are \['default'\]")
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.adapter).set_adapter(None)


# ------------------------------------------------------------------------------------------------ weights that poison


def peft_export(env: Env, config=None) -> Path:
    directory = env.root / "peft"
    model = SoftPromptModel(env.base, config or PromptTuningConfig(num_virtual_tokens=4))
    model.save_pretrained(directory, format="peft")
    return directory


def rewrite_peft_tensor(env: Env, value: torch.Tensor, config=None) -> None:
    directory = peft_export(env, config)
    (directory / "adapter_model.safetensors").write_bytes(safetensors_save({"prompt_embeddings": value}))


for id, make, message in [
    ("NaN", lambda: torch.full((4, 64), float("nan")), r"tensor 'prompt_embeddings' holds NaN or infinite values"),
    ("infinite", lambda: torch.full((4, 64), float("inf")), r"tensor 'prompt_embeddings' holds NaN or infinite values"),
    ("integer", lambda: torch.ones(4, 64, dtype=torch.long),
     r"tensor 'prompt_embeddings' holds dtype torch\.int64: expected finite floating-point weights"),
]:
    @case(f"PEFT weights: {id}", AdapterFormatError, message,
          prepare=lambda env, make=make: rewrite_peft_tensor(env, make()))
    def _(env):
        SoftPromptModel.from_pretrained(env.base, env.root / "peft")


@case("PEFT prefix config without its shape fields (the flat width fits other shapes)", AdapterFormatError,
      r"token_dim, num_attention_heads, num_layers missing or not a positive integer.*fits any base whose product "
      r"agrees",
      prepare=lambda env: (peft_export(env, PrefixTuningConfig(num_virtual_tokens=3)), edit_json(
          env.root / "peft" / "adapter_config.json",
          lambda d: [d.pop(key) for key in ("token_dim", "num_layers", "num_attention_heads")])))
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.root / "peft")


@case("PEFT peft_type of the wrong JSON kind", AdapterFormatError,
      r"peft_type \['PROMPT_TUNING'\]: expected a soft-prompt adapter|a PEFT adapter of another kind",
      prepare=lambda env: (peft_export(env), edit_json(env.root / "peft" / "adapter_config.json",
                                                       lambda d: d.update(peft_type=["PROMPT_TUNING"]))))
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.root / "peft")


def deep_json(env: Env) -> None:
    (env.adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)


@case("an adapter config nested 100,000 levels deep", AdapterFormatError, r"adapter_config\.json: not valid JSON: "
      r"nested too deeply", prepare=deep_json)
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.adapter)


@case("a run config file nested 100,000 levels deep", CommandFailed, r"exit 2: .*run\.yaml' is nested too deeply",
      prepare=lambda env: (env.root / "run.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n"))
def _(env):
    train_cli(env, "--config", env.root / "run.yaml")


# ------------------------------------------------------------------------------------------------ size before read

GIGABYTES = 3 * 2**30


def sparse_weights(env: Env, directory: Path, name: str) -> None:
    """The weights file extended to 3 GB without writing its data: sparse, so it costs no disk."""
    with open(directory / name, "r+b") as file:
        file.truncate(GIGABYTES)


@case("our weights file grown to 3 GB while its record says a few KB", AdapterFormatError,
      r"adapter\.safetensors: 3221225472 bytes, but the adapter config records \d+: the file is truncated or was "
      r"replaced", prepare=lambda env: sparse_weights(env, env.adapter, "adapter.safetensors"))
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.adapter)


@case("a PEFT weights file grown to 3 GB past what its header describes", AdapterFormatError,
      r"adapter_model\.safetensors: 3221225472 bytes, but its header describes \d+: the file is truncated or corrupt",
      prepare=lambda env: (peft_export(env), sparse_weights(env, env.root / "peft", "adapter_model.safetensors")))
def _(env):
    SoftPromptModel.from_pretrained(env.base, env.root / "peft")


# ------------------------------------------------------------------------------------------------ text stays text


# ------------------------------------------------------------------------------------------------ the operating system


@case("a folder where the --config file is expected", CommandFailed,
      r"exit 2: .*Config file '.*run\.yaml' is a folder: expected a \.yaml, \.yml or \.json file",
      prepare=lambda env: (env.root / "run.yaml").mkdir())
def _(env):
    train_cli(env, "--config", env.root / "run.yaml")


@case("a folder where the --dataset file is expected", CommandFailed,
      r"exit 2: .*Data file '.*rows\.csv' is a folder: expected a \.csv file",
      prepare=lambda env: (env.root / "rows.csv").mkdir())
def _(env):
    train_cli(env, "--dataset", env.root / "rows.csv", "--text-column", "text")


@case("a data file that is a symbolic-link loop", CommandFailed, r"exit [12]: .*loop\.csv.*(circle of symbolic "
      r"links|does not exist)", prepare=lambda env: (os.symlink("loop.csv", env.root / "loop.csv")))
def _(env):
    train_cli(env, "--dataset", env.root / "loop.csv", "--text-column", "text")


@case("permission denied reading the adapter (simulated: tests run as root)", CommandFailed,
      r"exit 1: softprompt eval: error: .*adapter_config\.json: permission denied\. Fix:")
def _(env):
    real_read_text = Path.read_text

    def refused(self, *args, **kwargs):
        if self.name == "adapter_config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    with env.monkeypatch.context() as patch:  # undone before the harness reads the folder again
        patch.setattr(Path, "read_text", refused)
        cli("eval", "--adapter", env.adapter)


@case("a malformed JSON Lines row", CommandFailed,
      r"exit 2: .*rows\.jsonl' as json: line 2 is not a JSON record .* Fix: correct or remove that line",
      prepare=lambda env: (env.root / "rows.jsonl").write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n'))
def _(env):
    train_cli(env, "--dataset", env.root / "rows.jsonl", "--text-column", "text")


@case("a UTF-16 CSV file", CommandFailed, r"exit 2: .*rows\.csv' as csv: it is UTF-16 text .* Fix: save it as UTF-8",
      prepare=lambda env: (env.root / "rows.csv").write_bytes("text\nhello\nworld\n".encode("utf-16")))
def _(env):
    train_cli(env, "--dataset", env.root / "rows.csv", "--text-column", "text")


# ------------------------------------------------------------------------------------------------ API misuse

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


@case("compute_loss with every label -100 (was NaN)", ValueError,
      r"The labels hold no labelled position .* the mean loss would be NaN\. Fix: label at least one token")
def _(env):
    model = SoftPromptModel(env.base, PromptTuningConfig(num_virtual_tokens=2))
    model.compute_loss(IDS, MASK, torch.full_like(IDS, -100))


@case("generate on a right-padded batch (a short row continued after its padding)", ValueError,
      r"attention_mask row 1 has padding after real tokens.* Fix: pad on the left")
def _(env):
    SoftPromptModel(env.base, PromptTuningConfig(num_virtual_tokens=2)).generate(IDS, MASK, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ the tests


def test_the_catalogue_holds_every_case_of_the_issue():
    assert len(CASES) >= 30, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES), "two cases share an id"


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_a_hostile_input_gets_its_message_and_changes_nothing(bad, finished_run, run_base, tmp_path, monkeypatch):
    run_case(bad, finished_run, run_base, tmp_path, monkeypatch)


def test_the_size_is_checked_before_the_data_is_read(finished_run, run_base, tmp_path):
    # A sparse 30 GB weights file: refused from its size alone, in well under a second, without the process's memory
    # growing by anything like its size (reading it would need 30 GB).
    import resource
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    with open(adapter / "adapter.safetensors", "r+b") as file:
        file.truncate(30 * 2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    with pytest.raises(AdapterFormatError, match=r"32212254720 bytes, but the adapter config records"):
        SoftPromptModel.from_pretrained(run_base, adapter)
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # < 200 MiB


def test_special_token_strings_in_data_and_labels_stay_text(tokenizer):
    # '</s>' is this tokenizer's EOS: read as text, a label '</s>' is its characters (not [EOS, EOS]), and a tweet
    # that contains it keeps going past it (no end of sequence in the middle of the prompt).
    from softprompt.recipes import classification_examples

    rows = [{"text": "the crew </s> was lovely", "label": "</s>"}]
    (example,) = classification_examples(rows, tokenizer, text_column="text", label_column="label", max_length=64)
    eos = tokenizer.eos_token_id
    label_ids = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert label_ids[-1] == eos and eos not in label_ids[:-1], label_ids  # one EOS: the one the recipe appends
    assert tokenizer.decode(label_ids[:-1]).strip() == "</s>"
    prompt_ids = [token for token, label in zip(example["input_ids"], example["labels"]) if label == -100]
    assert eos not in prompt_ids and "</s> was lovely" in tokenizer.decode(prompt_ids)


def test_ctrl_c_outside_the_training_loop_prints_one_line_and_exits_130(finished_run, monkeypatch, capsys):
    # Before the loop (loading the base) and during generate, Ctrl-C printed a blank "softprompt train: " line.
    from softprompt import cli as command_line
    from softprompt import generation

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "generate", interrupt)
    assert command_line.main(["generate", "--adapter", str(finished_run / "adapter"), "--prompt", "hi"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "softprompt generate: interrupted (Ctrl-C)"
    monkeypatch.setattr("softprompt.training.loop.load_run_base", interrupt)
    assert command_line.main(["train", *RUN_FLAGS, "--output-dir", str(finished_run.parent / "x")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("softprompt train: Interrupted")


def test_a_full_disk_says_free_space_then_resume(tmp_path, monkeypatch, capsys):
    # The disk fills while the run writes its second checkpoint: one line saying what to do, no traceback, and
    # --resume afterwards finishes the run from the last complete checkpoint.
    from softprompt import cli as command_line
    from softprompt import files

    real_fsync, calls = files.os.fsync, {"count": 0}

    def fsync(descriptor):
        calls["count"] += 1
        if calls["count"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", fsync)
    run = tmp_path / "run"
    assert command_line.main(["train", *RUN_FLAGS, "--output-dir", str(run)]) == 1
    error = capsys.readouterr().err
    assert "no space left on the device" in error
    assert "Fix: free space, then run the same command with --resume" in error
    assert "Traceback" not in error
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert command_line.main(["train", *RUN_FLAGS, "--output-dir", str(run), "--resume"]) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_a_label_of_special_tokens_only_is_refused_with_its_row():
    # A tokenizer with an unknown token (here a word-level one) encodes unknown words as <unk>, which decoding skips:
    # such a label could never be predicted, so it is refused instead of training toward it.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from softprompt.recipes import classification_examples

    words = ["<unk>", "</s>", "<pad>", "text", ":", "label", "ham", "spam", "hello", "Label"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                        pad_token="<pad>")
    rows = [{"text": "hello", "label": "ham"}, {"text": "hello", "label": "spam"}, {"text": "hello", "label": "eggs"}]
    with pytest.raises(DataError, match=r"Row 2: the label 'eggs' encodes to special tokens only \(\[0\]\).*Fix: use"):
        classification_examples(rows, tokenizer, text_column="text", label_column="label", max_length=16)
