"""What differs between decoder families, as data: the `Family` record and the `BaseModelShape` it reads.

A soft prompt touches a frozen model at three seams: the input embeddings (virtual tokens), each layer's key/value
cache (prefixes) and the positions of the real tokens. What a family does at those seams is all that softprompt
needs to know about it, and every such difference is a field here, never a branch on ``model_type`` elsewhere:

- the shape of what the seams take: the width C of the input embeddings, and each layer's key/value heads K and
  head size D (grouped-query families cache fewer heads than they attend with; some set D apart from C / H);
- how positions reach the model: explicit ``position_ids`` (rotary and learned absolute positions), or derived by
  the model itself from the attention mask (BLOOM's ALiBi);
- limits on positions: a learned position table (GPT-2, OPT) or a sliding attention window, which would hide a
  prefix from tokens far enough after it;
- the embedding scale (Gemma multiplies word embeddings by sqrt(hidden) inside its embedding module, so
  ``inputs_embeds``, virtual tokens included, are used as given) and the final logit soft-capping (Gemma 2), which
  the label-only head of the training loss must apply as the model's own head does;
- for methods that work inside attention (adaption prompt), how each layer's attention can be reached from outside
  (`AttentionAccess`): which submodule it is, and which of its frozen projections, norms, scales and positions turn
  hidden states into queries and a prompt into keys and values.

Shapes: L layers, H query heads, K key/value heads, D head dim, C embedding width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from transformers import PretrainedConfig

PositionSource = Literal["position_ids", "attention_mask"]


@dataclass(frozen=True)
class AttentionAccess:
    """How a family's attention layers are reached from outside: forward hooks on one submodule per decoder layer,
    and that submodule's own frozen projections, never a copy of transformers' attention code.

    A method that adds a term inside attention (adaption prompt) needs, per layer: the queries the layer scores
    for the hidden states it is given, keys and values for tokens of its own through the same projections (at no
    position: they get no rotary and no ALiBi bias), the layer's score scale and soft-capping, and how attended
    values reach the layer's output. `softprompt.attention` reads these fields; nothing else differs between
    families there.
    """

    module: str
    """The attention submodule's name inside each decoder layer (``self_attn``; GPT-2 ``attn``, BLOOM
    ``self_attention``, GPT-NeoX ``attention``): PEFT's ``target_modules`` for adaption prompt. Its forward hooks
    see the hidden states it attends from (``hidden_states`` or the first argument) and the layer's keyword
    arguments (rotary ``position_embeddings``); its first output is what the layer adds to its residual."""
    projections: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    """The separate query, key and value projections' names (ignored when `fused` is set)."""
    fused: str | None = None
    """The one projection computing queries, keys and values together, if the family fuses them (GPT-2
    ``c_attn``, Phi-3 ``qkv_proj``, BLOOM and GPT-NeoX ``query_key_value``)."""
    fused_layout: Literal["blocks", "heads"] = "blocks"
    """How `fused`'s output is laid out: ``blocks`` = [queries H * D | keys K * D | values K * D] (GPT-2, Phi-3);
    ``heads`` = per head, its query, key and value of D each (BLOOM's ``(H, 3, D)``, GPT-NeoX's ``(H, 3 * D)``
    chunked: the same layout)."""
    query_norm: str | None = None
    """A norm over each query head before rotary positions (Qwen3 and Gemma 3 ``q_norm``), if any."""
    key_norm: str | None = None
    """The same over each key head (``k_norm``), applied to the adapter's keys too."""
    rotary: bool = True
    """Queries are rotated by the ``position_embeddings`` (cos, sin) the layer is given, on the first
    ``cos.shape[-1]`` dims of each head (all of them, or a part: GPT-NeoX's and Phi-3's partial rotary); False for
    learned absolute positions (GPT-2, OPT) and ALiBi (BLOOM)."""
    scale: str | None = "scaling"
    """The attention module's attribute holding the factor its scores ``q @ k^T`` are multiplied by (Gemma's
    ``query_pre_attn_scalar ** -0.5``, BLOOM's ``inv_norm_factor``); None: ``1 / sqrt(D)`` whatever the layer's
    own (PEFT's rule on GPT-2, whose ``scale_attn_by_inverse_layer_idx`` variants scale otherwise)."""
    softcap: str | None = None
    """The attention module's attribute holding its score soft-capping ``cap * tanh(scores / cap)`` (Gemma 2's
    ``attn_logit_softcapping``), if the layer applies one."""
    output: str | None = "o_proj"
    """The output projection attended values go through before joining the layer's output; None: they join it as
    they are (PEFT's GPT-2 composition, after ``c_proj``)."""
    output_bias: bool = False
    """Whether the output projection's bias comes with them (PEFT's Llama/Mistral composition calls ``o_proj``
    whole, so a biased ``o_proj`` shifts even a zero-gated layer). False: its weight alone, so that a zero gate is
    the base model exactly."""


@dataclass(frozen=True)
class BaseModelShape:
    """The dimensions of a frozen base model that a soft prompt depends on."""

    embedding_width: int
    """C: the width of the input embeddings (and of the LM head's input). The hidden size, except for OPT models
    whose word embeddings are narrower and projected in and out (opt-350m: 512 under 1024)."""
    num_layers: int
    """L: transformer layers, each with its own key/value cache."""
    num_heads: int
    """H: query heads."""
    num_key_value_heads: int
    """K: key/value heads per layer (H without grouped-query attention)."""
    head_dim: int
    """D: the size of one head's keys and values."""
    vocab_size: int
    """V: rows of the embedding matrix."""
    hidden_size: int
    """The model's own hidden size (the residual width); C except for narrow-embedding OPT models."""

    @property
    def key_value_width(self) -> int:
        """K * D: one layer's keys (or values) for one position, flattened."""
        return self.num_key_value_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        """L * 2 * K * D: one prefix position's keys and values for every layer, flattened."""
        return self.num_layers * 2 * self.key_value_width


@dataclass(frozen=True)
class Family:
    """One decoder family: the transformers ``model_type`` values it covers and what differs at the seams."""

    name: str
    """Human name, e.g. ``Llama``."""
    model_types: tuple[str, ...]
    """The transformers ``config.model_type`` values this record covers."""
    positions: PositionSource
    """How a token's position reaches the model: ``position_ids`` (softprompt passes them), or ``attention_mask``
    (the model derives positions from the mask itself, and takes no ``position_ids``)."""
    position_encoding: str
    """What a position becomes inside the model: ``ALiBi``, ``rotary``, ``partial rotary`` or ``learned`` (the README's
    family table)."""
    tiny_config: Callable[[int], PretrainedConfig]
    """A tiny random-weight config of this family for tests and examples, given the vocabulary size. It carries
    the family's quirks (grouped-query heads, a head size apart from C / H, soft-capping, narrow embeddings, ...)
    at a size that runs in milliseconds."""
    known_configs: Mapping[str, Callable[[], PretrainedConfig]] = field(default_factory=dict)
    """Real models' configs by hub name, known offline (from their published ``config.json``), so that
    ``softprompt params --model NAME`` needs no download."""
    embedding_width_field: str = "hidden_size"
    """The config field that holds C."""
    embedding_scale: Literal["none", "sqrt_hidden_size"] = "none"
    """What the embedding module multiplies word embeddings by. Applied inside the module, so ``inputs_embeds``
    (virtual tokens included) are used as given, and TEXT / SAMPLE_VOCAB init start from the scaled rows (PEFT's
    behaviour)."""
    logit_softcapping_field: str | None = None
    """The config field of the final logit soft-capping ``logits = cap * tanh(logits / cap)``, if the family has
    one."""
    position_table_field: str | None = None
    """The config field giving the size of a learned position table, if positions index one: virtual tokens and
    text together must fit it."""
    attention: AttentionAccess | None = None
    """How its attention layers are reached from outside (methods that work inside attention); None where they
    cannot be, which those methods refuse naming `attention_missing`."""
    attention_missing: str = "its attention layers are not described (Family.attention)"
    """What keeps methods that work inside attention off this family, for their refusal (when `attention` is
    None)."""
    needed: str = ""
    """What supporting this family took, in a sentence (the README's family table, `scripts/readme_tables.py`)."""

    def shape(self, config: PretrainedConfig) -> BaseModelShape:
        """The dimensions of a base model of this family, read from its config.

        K defaults to H and D to hidden / H, transformers' own defaults, where the config names none.
        """
        num_heads = config.num_attention_heads
        return BaseModelShape(
            embedding_width=getattr(config, self.embedding_width_field),
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
        )

    def logit_softcap(self, config: PretrainedConfig) -> float | None:
        """The final logits' soft-capping value, or None."""
        return getattr(config, self.logit_softcapping_field, None) if self.logit_softcapping_field else None

    def max_positions(self, config: PretrainedConfig) -> int | None:
        """The size of a learned position table, or None when positions are not limited by one."""
        return getattr(config, self.position_table_field) if self.position_table_field else None

    @staticmethod
    def sliding_window(config: PretrainedConfig) -> int | None:
        """The attention window of the sliding-window layers, or None when every layer attends to everything.

        transformers marks sliding layers in ``config.layer_types`` where a family has mixed layers (Gemma, Qwen2)
        and gives families whose every layer slides (Mistral, Phi-3) a ``sliding_window`` alone.
        """
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
            return None
        return int(window)
