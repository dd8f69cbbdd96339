"""Prompt tuning: a table of trainable virtual-token embeddings in front of the input.

Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning" (EMNLP 2021).

The method in one sentence: keep the language model frozen and learn P vectors of the model's embedding width C
that are placed in front of every input's token embeddings, as if they were the embeddings of P extra "virtual"
tokens. Nothing else changes: the virtual tokens pass through every transformer layer like real tokens, and only
the ``[P, C]`` table receives gradients.

How it enters the model (`reference_forward`, PEFT's way, written out):

1. ``inputs_embeds = cat(table [P, C] for every row, embed(input_ids) [B, T, C])``: ``[B, P + T, C]``;
2. the attention mask gets P ones in front (before any left padding), the labels P times -100, so the last
   virtual position predicts the first real token;
3. the real tokens take positions P, P + 1, ... (`softprompt.positions`).

On the real path, `enter` hands the engine the table as `softprompt.entries.VirtualTokens`; the engine either puts
them in front of every row as above, or, when that saves work, runs them once and lets every row continue from
their keys and values (`softprompt.training_loss`).

Initialization (``prompt_tuning_init``):

- ``RANDOM``: N(0, 1), the default of ``nn.Embedding`` (what PEFT does).
- ``TEXT``: the frozen embeddings of the tokenized ``prompt_tuning_init_text``; a text of fewer than P tokens is
  repeated whole until P ids are reached, a longer one is cut to its first P ids (PEFT's rule).
- ``SAMPLE_VOCAB``: the frozen embeddings of P ids drawn uniformly at random. Unlike PEFT, which draws from every
  row of the embedding matrix, only ids the tokenizer can produce are drawn: BLOOM's matrix has rows past the
  tokenizer's vocabulary that were never trained.

Shapes: B batch, T tokens, P virtual tokens, C embedding width, V vocab.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.entries import EntryRequest, VirtualTokens
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.loss import IGNORE_INDEX
from softprompt.methods.spec import (
    MethodSpec,
    Paper,
    check_fits_in_memory,
    check_positive_int,
    from_prompt_embeddings,
)
from softprompt.positions import position_inputs


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
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "PromptTuningConfig(num_virtual_tokens=8)")
        try:
            init = self.prompt_tuning_init
            self.prompt_tuning_init = PromptTuningInit(init.upper() if isinstance(init, str) else init)
        except ValueError:
            choices = ", ".join(member.value for member in PromptTuningInit)
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r}: expected one of {choices}. "
                "Fix: pick one of those names."
            ) from None
        if self.prompt_tuning_init_text is not None and not isinstance(self.prompt_tuning_init_text, str):
            raise ValueError(
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r}: expected a string or None. Fix: quote it, "
                "e.g. prompt_tuning_init_text='Classify if the tweet is a complaint or not:'."
            )
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str):
            raise ValueError(
                f"tokenizer_name_or_path={self.tokenizer_name_or_path!r}: expected a string (a tokenizer's hub id or "
                "directory) or None. Fix: quote it, or leave it out."
            )
        if self.prompt_tuning_init is not PromptTuningInit.TEXT and self.prompt_tuning_init_text is not None:
            raise ValueError(
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} with "
                f"prompt_tuning_init={self.prompt_tuning_init.value}: the text would be ignored, since only TEXT init "
                "starts from a text. Fix: pass prompt_tuning_init='TEXT' (--prompt-tuning-init TEXT) to start from "
                "it, or drop the text."
            )
        if self.prompt_tuning_init is PromptTuningInit.TEXT and not self.prompt_tuning_init_text:
            raise ValueError(
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} with prompt_tuning_init=TEXT: expected a "
                "non-empty text to initialize from. Fix: pass prompt_tuning_init_text='Classify if the tweet is a "
                "complaint or not:' (and a tokenizer to SoftPromptModel), or use prompt_tuning_init='RANDOM'."
            )


def cycle_to_length(token_ids: list[int], length: int) -> list[int]:
    """Repeat `token_ids` whole until `length` ids are reached, or cut them to `length` (PEFT's TEXT rule).

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


def init_token_ids(config: PromptTuningConfig, tokenizer: Any | None) -> list[int] | None:
    """The token ids whose embeddings start the table, or None for RANDOM init.

    Raises:
        ValueError: TEXT or SAMPLE_VOCAB init without a tokenizer.
    """
    # Compared by value (the enums are strings): multitask prompt tuning's init enum shares these three names.
    if config.prompt_tuning_init == PromptTuningInit.RANDOM:
        return None
    if tokenizer is None:
        raise ValueError(
            f"prompt_tuning_init={config.prompt_tuning_init.value} needs a tokenizer, got tokenizer=None. "
            "Fix: SoftPromptModel(base_model, config, tokenizer=AutoTokenizer.from_pretrained(...)), "
            "or use prompt_tuning_init='RANDOM'."
        )
    if config.prompt_tuning_init == PromptTuningInit.TEXT:
        # With special tokens, as PEFT tokenizes it (BLOOM's tokenizer adds none).
        return cycle_to_length(tokenizer(config.prompt_tuning_init_text)["input_ids"], config.num_virtual_tokens)
    # SAMPLE_VOCAB: only ids the tokenizer produces, so that no never-trained embedding row is drawn.
    producible = sorted(set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids))
    picks = torch.randint(len(producible), (config.num_virtual_tokens,), device="cpu")
    return [producible[i] for i in picks.tolist()]


class PromptEmbedding(nn.Module):
    """The ``[P, C]`` table of virtual-token embeddings.

    Args:
        config: the prompt-tuning configuration.
        embedding_width: C, the width of the base model's input embeddings.
        init_embeddings: ``[P, C]`` rows to start from (TEXT and SAMPLE_VOCAB init), or None for RANDOM init.
    """

    def __init__(self, config: PromptTuningConfig, embedding_width: int, init_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        # nn.Embedding's default init is N(0, 1), PEFT's RANDOM init; the name `embedding` makes the state dict
        # read like PEFT's `prompt_encoder.default.embedding.weight`.
        self.embedding = nn.Embedding(config.num_virtual_tokens, embedding_width)
        if init_embeddings is not None:
            expected = (config.num_virtual_tokens, embedding_width)
            if tuple(init_embeddings.shape) != expected:
                raise ValueError(
                    f"init_embeddings has shape {tuple(init_embeddings.shape)}: expected [P, C] = {expected}."
                )
            with torch.no_grad():
                self.embedding.weight.copy_(init_embeddings.float())

    def forward(self) -> torch.Tensor:
        """Returns the virtual-token embeddings, ``[P, C]``."""
        return self.embedding.weight


def build(config: PromptTuningConfig, base_model: PreTrainedModel, tokenizer: Any | None) -> PromptEmbedding:
    """The table, initialized as ``config.prompt_tuning_init`` says, on the base's device.

    TEXT and SAMPLE_VOCAB rows are looked up through the base's embedding module, so they are what the model itself
    feeds its first layer (Gemma's embedding scale included).
    """
    shape = family_of(base_model.config).shape(base_model.config)
    word_embeddings = base_model.get_input_embeddings()
    device = word_embeddings.weight.device
    check_fits_in_memory(config, shape.embedding_width, device)
    init_ids = init_token_ids(config, tokenizer)
    init_embeddings = None
    if init_ids is not None:
        init_embeddings = word_embeddings(torch.tensor(init_ids, device=device)).detach().float()
    with torch.device(device):
        return PromptEmbedding(config, shape.embedding_width, init_embeddings)


def empty(config: PromptTuningConfig, shape: BaseModelShape) -> PromptEmbedding:
    """The table's structure, about to receive stored weights."""
    return PromptEmbedding(config, shape.embedding_width)


def from_table(config: PromptTuningConfig, shape: BaseModelShape, table: torch.Tensor) -> PromptEmbedding:
    """A prompt-tuning module holding a stored ``[P, C]`` table (the whole of a prompt-tuning adapter)."""
    return PromptEmbedding(config, shape.embedding_width, init_embeddings=table)


def enter(module: nn.Module, request: EntryRequest) -> VirtualTokens:
    """The table (or any module's ``[P, C]`` output) as the virtual tokens of every row of the adapter."""
    return VirtualTokens(module().unsqueeze(0))  # [1, P, C]: one prompt for all rows


def reference_forward(
    base_model: PreTrainedModel,
    virtual_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """Virtual tokens in front of every row, as PEFT puts them; the plain reference the engine is tested against.

    Args:
        base_model: the frozen transformers causal LM.
        virtual_tokens: ``[P, C]``, the method module's output (or ``[B, P, C]``, each row its own).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]`` (-100 where no loss is wanted) or None.

    Returns:
        The base model's output: ``.logits [B, P + T, V]`` (virtual positions first, as in PEFT) and ``.loss``.
    """
    batch_size, num_tokens = input_ids.shape
    num_virtual = virtual_tokens.shape[0]
    token_embeddings = base_model.get_input_embeddings()(input_ids)  # [B, T, C]
    virtual = virtual_tokens.to(token_embeddings.dtype).expand(batch_size, -1, -1)  # [B, P, C]
    mask = torch.cat([attention_mask.new_ones(batch_size, num_virtual), attention_mask], dim=1)  # [B, P + T]
    if labels is not None:
        labels = F.pad(labels, (num_virtual, 0), value=IGNORE_INDEX)  # [B, P + T]
    return base_model(
        inputs_embeds=torch.cat([virtual, token_embeddings], dim=1),  # [B, P + T, C]
        attention_mask=mask,
        labels=labels,
        **position_inputs(family_of(base_model.config), mask, num_virtual + num_tokens),
    )


METHOD = MethodSpec(
    name="prompt_tuning",
    cli_name="prompt-tuning",
    config_class=PromptTuningConfig,
    enters_as="virtual_tokens",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="PROMPT_TUNING",
    peft_fields=("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"),
    default_num_virtual_tokens=8,
    peft_module=from_prompt_embeddings(from_table),
    paper=Paper("Lester, Al-Rfou and Constant", 2021, "2104.08691",
                "The Power of Scale for Parameter-Efficient Prompt Tuning"),
    trains="a `[P, C]` table of virtual-token embeddings",
    reference_forward=reference_forward,
    exports=(PromptTuningConfig, PromptTuningInit),
)
