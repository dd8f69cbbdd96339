"""P-tuning: virtual-token embeddings produced by a small trainable encoder.

Liu, Zheng, Du, Ding, Qian, Yang and Tang, "GPT Understands, Too" (2021, arXiv:2103.10385).

The method in one sentence: like prompt tuning, P virtual-token embeddings of width C go in front of the input's
token embeddings, but instead of training the ``[P, C]`` table directly, the table is fed through a
reparameterization network (an MLP or a bidirectional LSTM) and the network's output is what goes in front of the
input. The paper found this trains more stably than a free table. Only the table and the encoder are trained; once
training is done the encoder's output is a fixed ``[P, C]`` tensor and the encoder can be dropped (softprompt's
adapter format stores both, so that training can resume exactly; PEFT keeps only the output).

How it enters the model: exactly as prompt tuning's table does, the encoder's output in its place (`enter` and
`reference_forward` are prompt tuning's, see ``softprompt/methods/prompt_tuning.py``).

The encoders, as two small classes:

- `MLPPromptEncoder`: table -> Linear(C, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, C). Like PEFT, always three
  Linear layers; ``encoder_num_layers`` and ``encoder_dropout`` do not apply to it.
- `LSTMPromptEncoder`: table -> bidirectional LSTM(C, h, encoder_num_layers, dropout) -> Linear(2h, 2h) -> ReLU ->
  Linear(2h, C).

Shapes: P virtual tokens, C embedding width, h ``encoder_hidden_size``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel

from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.methods.prompt_tuning import enter, reference_forward
from softprompt.methods.spec import (
    MaterializedPrompt,
    MethodSpec,
    Paper,
    check_fits_in_memory,
    check_positive_int,
    from_prompt_embeddings,
)


class PromptEncoderReparameterizationType(str, enum.Enum):
    """Which network produces the virtual tokens (PEFT's names and values)."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig:
    """Configuration of p-tuning; a PEFT user switches by changing the import."""

    num_virtual_tokens: int = None  # type: ignore[assignment]
    """P, the number of virtual tokens put in front of every input. Required."""

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    """``MLP`` or ``LSTM``: the network that turns the table into virtual tokens."""

    encoder_hidden_size: int | None = None
    """h, the encoder's width; None means C, the width of the base's input embeddings (PEFT's default)."""

    encoder_num_layers: int = 2
    """Layers of the LSTM (PEFT's default 2). Ignored by the MLP, which always has three Linear layers, as in PEFT."""

    encoder_dropout: float = 0.0
    """Dropout between LSTM layers (only with ``encoder_num_layers > 1``). Ignored by the MLP, as in PEFT."""

    method: ClassVar[str] = "p_tuning"

    def __post_init__(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "PromptEncoderConfig(num_virtual_tokens=20)")
        try:
            kind = self.encoder_reparameterization_type
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                kind.upper() if isinstance(kind, str) else kind
            )
        except ValueError:
            raise ValueError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r}: expected 'MLP' or "
                "'LSTM'. Fix: pick one of those."
            ) from None
        check_positive_int(
            "encoder_hidden_size", self.encoder_hidden_size, "encoder_hidden_size=128 (None means the model's width)",
            allow_none=True,
        )
        check_positive_int("encoder_num_layers", self.encoder_num_layers, "encoder_num_layers=2")
        if (
            not isinstance(self.encoder_dropout, (int, float))
            or isinstance(self.encoder_dropout, bool)
            or not 0.0 <= self.encoder_dropout < 1.0
        ):
            raise ValueError(
                f"encoder_dropout={self.encoder_dropout!r}: expected a probability in [0, 1). "
                "Fix: pass e.g. encoder_dropout=0.1."
            )


class MLPPromptEncoder(nn.Module):
    """Virtual tokens = MLP(table): Linear(C, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, C).

    Args:
        config: the p-tuning configuration (``encoder_reparameterization_type`` MLP).
        embedding_width: C, the width of the base model's input embeddings.
    """

    def __init__(self, config: PromptEncoderConfig, embedding_width: int):
        super().__init__()
        self.config = config
        encoder_hidden_size = config.encoder_hidden_size or embedding_width
        self.embedding = nn.Embedding(config.num_virtual_tokens, embedding_width)
        self.mlp_head = nn.Sequential(
            nn.Linear(embedding_width, encoder_hidden_size),
            nn.ReLU(),
            nn.Linear(encoder_hidden_size, encoder_hidden_size),
            nn.ReLU(),
            nn.Linear(encoder_hidden_size, embedding_width),
        )

    def forward(self) -> torch.Tensor:
        """Returns the virtual-token embeddings, ``[P, C]``."""
        return self.mlp_head(self.embedding.weight)


class LSTMPromptEncoder(nn.Module):
    """Virtual tokens = MLP(BiLSTM(table)): the LSTM lets each virtual token see all the others.

    Args:
        config: the p-tuning configuration (``encoder_reparameterization_type`` LSTM).
        embedding_width: C, the width of the base model's input embeddings.
    """

    def __init__(self, config: PromptEncoderConfig, embedding_width: int):
        super().__init__()
        self.config = config
        encoder_hidden_size = config.encoder_hidden_size or embedding_width
        self.embedding = nn.Embedding(config.num_virtual_tokens, embedding_width)
        self.lstm_head = nn.LSTM(
            input_size=embedding_width,
            hidden_size=encoder_hidden_size,
            num_layers=config.encoder_num_layers,
            dropout=config.encoder_dropout,
            bidirectional=True,
            batch_first=True,
        )
        self.mlp_head = nn.Sequential(
            nn.Linear(2 * encoder_hidden_size, 2 * encoder_hidden_size),
            nn.ReLU(),
            nn.Linear(2 * encoder_hidden_size, embedding_width),
        )

    def forward(self) -> torch.Tensor:
        """Returns the virtual-token embeddings, ``[P, C]``."""
        table = rearrange(self.embedding.weight, "p c -> 1 p c")  # the LSTM wants a batch: [1, P, C]
        lstm_output, _ = self.lstm_head(table)  # [1, P, 2h]: forward and backward directions side by side
        return self.mlp_head(rearrange(lstm_output, "1 p h -> p h"))  # [P, C]


def empty(config: PromptEncoderConfig, shape: BaseModelShape) -> MLPPromptEncoder | LSTMPromptEncoder:
    """The encoder that ``config.encoder_reparameterization_type`` names (PyTorch's default initialization)."""
    if config.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM:
        return LSTMPromptEncoder(config, shape.embedding_width)
    return MLPPromptEncoder(config, shape.embedding_width)


def build(
    config: PromptEncoderConfig, base_model: PreTrainedModel, tokenizer: Any | None = None
) -> MLPPromptEncoder | LSTMPromptEncoder:
    """The encoder, on the base's device; it needs no other initialization."""
    shape = family_of(base_model.config).shape(base_model.config)
    device = base_model.get_input_embeddings().weight.device
    check_fits_in_memory(config, shape.embedding_width, device)
    with torch.device(device):
        return empty(config, shape)


def from_table(config: PromptEncoderConfig, shape: BaseModelShape, table: torch.Tensor) -> MaterializedPrompt:
    """An encoder's stored ``[P, C]`` output as a fixed table: usable as is, trainable only as a plain table."""
    return MaterializedPrompt(table)


METHOD = MethodSpec(
    name="p_tuning",
    cli_name="p-tuning",
    config_class=PromptEncoderConfig,
    enters_as="virtual_tokens",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="P_TUNING",
    peft_fields=(
        "num_virtual_tokens",
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    ),
    default_num_virtual_tokens=20,
    peft_module=from_prompt_embeddings(from_table),
    paper=Paper("Liu et al.", 2021, "2103.10385", "GPT Understands, Too"),
    trains="a `[P, C]` table and its encoder: an MLP `C -> h -> h -> C`, or a bidirectional LSTM `(C, h)` then "
           "`2h -> 2h -> C` (h = `encoder_hidden_size`)",
    reference_forward=reference_forward,
    exports=(PromptEncoderConfig, PromptEncoderReparameterizationType),
)

__all__ = [
    "LSTMPromptEncoder",
    "METHOD",
    "MLPPromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "reference_forward",
]
