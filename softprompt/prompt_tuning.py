"""Prompt tuning: a table of trainable virtual-token embeddings.

Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning" (EMNLP 2021).

The method in one sentence: keep the language model frozen and learn P vectors of the model's hidden width C
that are placed in front of every input's token embeddings, as if they were the embeddings of P extra
"virtual" tokens. Nothing else changes: the virtual tokens pass through the embedding LayerNorm and every
transformer layer like real tokens, and only the ``[P, C]`` table receives gradients.

This file holds the configuration (`PromptTuningConfig`, field names and defaults as in PEFT) and the module
(`PromptEmbedding`). How the table is put in front of the input lives in ``softprompt/model.py``.

Initialization (``prompt_tuning_init``):
- ``RANDOM``: N(0, 1), the default of ``nn.Embedding`` (what PEFT does).
- ``TEXT``: the frozen embeddings of the tokenized ``prompt_tuning_init_text``; a text of fewer than P tokens is
  repeated whole until P ids are reached, a longer one is truncated to its first P ids (PEFT's rule).
- ``SAMPLE_VOCAB``: the frozen embeddings of P token ids drawn uniformly at random. Unlike PEFT, which draws from
  every row of the embedding matrix, we draw only ids the tokenizer can produce: BLOOM's matrix has rows past the
  tokenizer's vocabulary that were never trained.

Shapes: P virtual tokens, C hidden size, V vocabulary size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token table starts (PEFT's names and values)."""

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


@dataclass
class PromptTuningConfig:
    """Configuration of prompt tuning; a PEFT user switches by changing the import."""

    num_virtual_tokens: int = None  # type: ignore[assignment]
    """P, the number of virtual tokens put in front of every input. Required."""

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    """``RANDOM``, ``TEXT`` or ``SAMPLE_VOCAB``; see the module docstring."""

    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the table when ``prompt_tuning_init`` is ``TEXT``."""

    tokenizer_name_or_path: str | None = None
    """Recorded for PEFT compatibility; softprompt never loads a tokenizer itself (pass one to the model)."""

    method: ClassVar[str] = "prompt_tuning"

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool):
            raise ValueError(
                f"num_virtual_tokens={self.num_virtual_tokens!r}: expected a positive int. "
                "Fix: pass e.g. PromptTuningConfig(num_virtual_tokens=8)."
            )
        if self.num_virtual_tokens <= 0:
            raise ValueError(
                f"num_virtual_tokens={self.num_virtual_tokens}: expected a positive int (at least 1 virtual token). "
                "Fix: pass e.g. num_virtual_tokens=8."
            )
        try:
            self.prompt_tuning_init = PromptTuningInit(
                self.prompt_tuning_init.upper() if isinstance(self.prompt_tuning_init, str) else self.prompt_tuning_init
            )
        except ValueError:
            choices = ", ".join(member.value for member in PromptTuningInit)
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r}: expected one of {choices}. "
                "Fix: pick one of those names."
            ) from None
        if self.prompt_tuning_init is PromptTuningInit.TEXT and not self.prompt_tuning_init_text:
            raise ValueError(
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} with prompt_tuning_init=TEXT: expected a "
                "non-empty text to initialize from. Fix: pass prompt_tuning_init_text='Classify if the tweet is a "
                "complaint or not:' (and a tokenizer to SoftPromptModel), or use prompt_tuning_init='RANDOM'."
            )


def cycle_to_length(token_ids: list[int], length: int) -> list[int]:
    """Repeat `token_ids` whole until `length` ids are reached, or truncate them to `length` (PEFT's TEXT rule).

    Example: ``cycle_to_length([a, b, c], 7) == [a, b, c, a, b, c, a]``.

    Raises:
        ValueError: if `token_ids` is empty.
    """
    if not token_ids:
        raise ValueError(
            "The init text tokenized to 0 ids: expected at least one token. Fix: use a non-empty "
            "prompt_tuning_init_text that your tokenizer can encode."
        )
    repeats = -(-length // len(token_ids))  # ceil division
    return (token_ids * repeats)[:length]


class PromptEmbedding(nn.Module):
    """The ``[P, C]`` table of virtual-token embeddings.

    Args:
        config: the prompt-tuning configuration.
        hidden_size: C, the base model's hidden size.
        init_embeddings: ``[P, C]`` rows to start from (TEXT and SAMPLE_VOCAB init; the caller looks them up in
            the frozen word embeddings), or None for RANDOM init.
    """

    def __init__(self, config: PromptTuningConfig, hidden_size: int, init_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        # nn.Embedding's default init is N(0, 1), which is PEFT's RANDOM init; we keep the name `embedding` so that
        # the state dict reads like PEFT's `prompt_encoder.default.embedding.weight`.
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden_size)
        if init_embeddings is not None:
            expected = (config.num_virtual_tokens, hidden_size)
            if tuple(init_embeddings.shape) != expected:
                raise ValueError(
                    f"init_embeddings has shape {tuple(init_embeddings.shape)}: expected [P, C] = {expected}."
                )
            with torch.no_grad():
                self.embedding.weight.copy_(init_embeddings.float())

    def forward(self) -> torch.Tensor:
        """Returns the virtual-token embeddings, ``[P, C]``."""
        return self.embedding.weight
