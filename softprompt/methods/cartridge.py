"""Cartridges: a trained key/value cache that stands in for a long text in front of every input.

Eyuboglu, Ehrlich, Arora, Guha, Zinsley, Liu, Tennien, Rudra, Zou, Mirhoseini and Ré, "Cartridges: Lightweight and
general-purpose long context representations via self-study" (arXiv 2506.06266, 2025).

The method in one sentence: instead of putting a long document in front of every question (whose key/value cache
costs memory and time at every decoding step), train a small cache of P key/value positions per layer, the
*cartridge*, so that the frozen model with the cartridge in front answers as it would with the whole document in
front. The cartridge is the trainable parameter itself: ``[P, L * 2 * K * D]`` numbers in prefix tuning's layout
(`softprompt.methods.prefix_tuning.split_key_values`), with no reparameterization.

What makes it more than prefix tuning:

- **Initialization from real text.** The paper finds that a cartridge trains well only when it starts as the cache
  of real tokens: the frozen model's own keys and values of the first P tokens of a text (usually the document), as
  its prefill leaves them in the cache (`table_from_text`). Such a cartridge is, before any training, exactly the
  text in context: the model continues after it as after the text. PEFT's default, kept here, is N(0, 1).
- **Frozen first tokens.** The first ``num_frozen_tokens`` positions (PEFT's default 1) never train: language
  models use the first position as an attention sink, and moving it destabilizes training. PEFT keeps them as a
  separate parameter, ``frozen_embedding`` (``requires_grad=False``, counted in "all params"), beside
  ``trainable_embedding``; so does `CartridgeCache`, and it keeps them frozen whoever calls ``requires_grad_``.
- **Composition.** Two cartridges trained on two documents can be concatenated and used together (`compose`).
- **Training** (not part of the method in PEFT, which leaves the loss to the user): context distillation on
  synthetic conversations about the document, the paper's *self-study* (``softprompt/cartridges/``).

How it enters the model (`reference_forward`, PEFT's way, written out): exactly as a prefix-tuning table does.
Every layer's keys and values ``[B, K, P, D]`` go into a transformers ``DynamicCache`` handed to the model as the
cache of P tokens it has already seen; the attention mask gets P ones in front; labels are unchanged; the real tokens
take positions P, P + 1, ... (`softprompt.positions`). A cartridge from a text's prefill holds keys already rotated to
positions 0..P-1, so the real tokens continue at P as they would after the text. On the real path `enter` hands the
engine the split keys and values (`softprompt.entries.KeyValues`), which go into the read-only
``softprompt/prefix_cache.py`` cache: unlike PEFT, which refuses gradient checkpointing for cartridges, training
works with it.

Shapes: B batch, T tokens, S text tokens, P cartridge positions, F frozen positions, L layers, K key/value heads,
D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.entries import EntryRequest, KeyValues
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.frozen import FrozenModel
from softprompt.methods.prefix_tuning import merge_key_values, split_key_values
from softprompt.methods.prefix_tuning import reference_forward as prefix_reference_forward
from softprompt.methods.spec import (
    MethodSpec,
    Paper,
    check_fits_in_memory,
    check_positive_int,
    from_prompt_embeddings,
)


@dataclass
class CartridgeConfig:
    """Configuration of a Cartridge; a PEFT user switches by changing the import (the init fields are ours)."""

    num_virtual_tokens: int = None  # type: ignore[assignment]
    """P, the cartridge's key/value positions in every layer. Required."""

    num_frozen_tokens: int = 1
    """F, the first positions kept frozen (the attention sink the paper freezes; PEFT's default 1); 0 to P."""

    init_text: str | None = None
    """Start the cache as the frozen model's own keys and values of this text's first P tokens (PEFT's
    ``initialize_kv_prefix_from_text``, done when the adapter is built; needs a tokenizer); None: N(0, 1), PEFT's
    default."""

    use_chat_template: bool = True
    """Tokenize ``init_text`` as a system message with the tokenizer's chat template, where it has one (PEFT's
    default); otherwise as plain text."""

    method: ClassVar[str] = "cartridge"

    def __post_init__(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "CartridgeConfig(num_virtual_tokens=64)")
        frozen = self.num_frozen_tokens
        if not isinstance(frozen, int) or isinstance(frozen, bool) or not 0 <= frozen <= self.num_virtual_tokens:
            raise ValueError(
                f"num_frozen_tokens={frozen!r} with num_virtual_tokens={self.num_virtual_tokens}: expected an int from "
                f"0 to {self.num_virtual_tokens} (the first positions to keep frozen). Fix: pass num_frozen_tokens=1, "
                "the paper's attention sink (--num-frozen-tokens 1), or 0 to train every position."
            )
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise ValueError(
                f"init_text={self.init_text!r}: expected a non-empty text whose prefill starts the cache, or None for "
                "N(0, 1). Fix: pass the document's text (--init-text TEXT), or leave it out."
            )
        if not isinstance(self.use_chat_template, bool):
            raise ValueError(f"use_chat_template={self.use_chat_template!r}: expected True or False.")


class CartridgeCache(nn.Module):
    """The cartridge: ``[P, L * 2 * K * D]`` keys and values, the first F rows frozen.

    Args:
        config: the cartridge's configuration.
        width: L * 2 * K * D, one position's keys and values for every layer.
        table: ``[P, width]`` rows to start from, or None for N(0, 1) (PEFT's init, in PEFT's order: frozen rows
            first).
    """

    def __init__(self, config: CartridgeConfig, width: int, table: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        num_frozen = config.num_frozen_tokens
        frozen = nn.Parameter(torch.empty(num_frozen, width), requires_grad=False) if num_frozen else None
        # PEFT's names: the state dict reads `frozen_embedding` / `trainable_embedding` in both libraries.
        self.register_parameter("frozen_embedding", frozen)
        self.trainable_embedding = nn.Parameter(torch.empty(config.num_virtual_tokens - num_frozen, width))
        with torch.no_grad():
            if table is None:
                if self.frozen_embedding is not None:
                    nn.init.normal_(self.frozen_embedding)
                nn.init.normal_(self.trainable_embedding)
            else:
                self.load_table(table)

    def load_table(self, table: torch.Tensor) -> None:
        """Copies a ``[P, L * 2 * K * D]`` table in: its first F rows into the frozen part, the rest into the
        trainable part (PEFT's ``load_prompt_embeddings``).

        Raises:
            ValueError: the table's shape is not ``[P, width]``.
        """
        expected = (self.config.num_virtual_tokens, self.trainable_embedding.shape[1])
        if tuple(table.shape) != expected:
            raise ValueError(f"table has shape {tuple(table.shape)}: expected [P, L * 2 * K * D] = {expected}.")
        num_frozen = self.config.num_frozen_tokens
        with torch.no_grad():
            if self.frozen_embedding is not None:
                self.frozen_embedding.copy_(table[:num_frozen])
            self.trainable_embedding.copy_(table[num_frozen:])

    def requires_grad_(self, requires_grad: bool = True) -> "CartridgeCache":
        """Sets the trainable rows' ``requires_grad``; the frozen rows stay frozen whatever is asked.

        `SoftPromptModel.set_adapter`, ``load_adapter(is_trainable=True)`` and `softprompt.multi_task.make_trainable`
        switch a whole adapter with ``module.requires_grad_(...)``; for a cartridge that means its trainable rows.
        (`forward` also detaches the frozen rows, so that no gradient reaches them even if their flag is set
        directly.)
        """
        self.trainable_embedding.requires_grad_(requires_grad)
        return self

    def forward(self) -> torch.Tensor:
        """Returns the whole cache, ``[P, L * 2 * K * D]``: frozen rows, then trainable rows (PEFT's ``weight``)."""
        if self.frozen_embedding is None:
            return self.trainable_embedding
        return torch.cat([self.frozen_embedding.detach(), self.trainable_embedding], dim=0)


# ------------------------------------------------------------------ initialization from a text's prefill


def init_token_ids(tokenizer: Any, text: str, use_chat_template: bool = True) -> list[int]:
    """The ids whose prefill starts a cartridge, as PEFT's ``initialize_kv_prefix_from_text`` tokenizes the text.

    With `use_chat_template`, the text as a system message, without a generation prompt; a tokenizer without a
    chat template (``apply_chat_template`` raises ValueError or TypeError) falls back, as in PEFT, to plain
    tokenization with the tokenizer's special tokens.
    """
    if use_chat_template and hasattr(tokenizer, "apply_chat_template"):
        try:
            ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                                add_generation_prompt=False, return_dict=False)
        except (TypeError, ValueError):  # no chat template
            pass
        else:
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def prefill_key_values(base_model: PreTrainedModel, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's own keys and values of `token_ids`, as its prefill leaves them in the cache.

    Args:
        base_model: the frozen base.
        token_ids: S ids, read from position 0.

    Returns:
        keys and values, each ``[L, K, S, D]`` in the base's dtype (keys of rotary families already rotated to
        positions 0..S-1). The base's parameters are frozen on the way, as everywhere in softprompt.
    """
    frozen = FrozenModel(base_model)
    ids = torch.tensor([list(token_ids)], device=frozen.device)  # [1, S]
    keys, values, _ = frozen.virtual_token_pass(frozen.embed(ids))  # each [L, 1, K, S, D]
    return keys[:, 0], values[:, 0]


def table_from_key_values(keys: torch.Tensor, values: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """The first P positions of a cache as a flat table ``[P, L * 2 * K * D]`` (prefix tuning's layout).

    Args:
        keys: ``[L, K, S, D]``.
        values: ``[L, K, S, D]``.
        num_virtual_tokens: P.

    Raises:
        ValueError: the cache holds fewer than P positions.
    """
    if keys.shape[2] < num_virtual_tokens:
        raise ValueError(
            f"The cache holds {keys.shape[2]} positions: a cartridge of num_virtual_tokens={num_virtual_tokens} "
            f"needs at least that many. Fix: prefill a longer text, or num_virtual_tokens <= {keys.shape[2]}."
        )
    return merge_key_values(keys[:, :, :num_virtual_tokens], values[:, :, :num_virtual_tokens]).float()


def table_from_text(base_model: PreTrainedModel, tokenizer: Any, text: str, num_virtual_tokens: int,
                    use_chat_template: bool = True) -> torch.Tensor:
    """``[P, L * 2 * K * D]``: the frozen model's keys and values of the first P tokens of `text`.

    Only those P tokens are run: attention is causal, so they do not depend on what follows (PEFT runs the whole
    text and keeps its first P positions, which is the same).

    Raises:
        ValueError: the text gives fewer than P tokens, or there is no tokenizer.
    """
    if tokenizer is None:
        raise ValueError(
            "A cartridge initialized from init_text needs a tokenizer, got tokenizer=None. Fix: "
            "SoftPromptModel(base_model, config, tokenizer=AutoTokenizer.from_pretrained(...)), or drop init_text."
        )
    token_ids = init_token_ids(tokenizer, text, use_chat_template)
    if len(token_ids) < num_virtual_tokens:
        raise ValueError(
            f"init_text gives {len(token_ids)} tokens: a cartridge of num_virtual_tokens={num_virtual_tokens} "
            f"starts from the first {num_virtual_tokens}. Fix: use a longer text, or num_virtual_tokens <= "
            f"{len(token_ids)}."
        )
    keys, values = prefill_key_values(base_model, token_ids[:num_virtual_tokens])
    return table_from_key_values(keys, values, num_virtual_tokens)


def table_from_past_key_values(past_key_values: Any, num_virtual_tokens: int) -> torch.Tensor:
    """PEFT's ``prompt_embeddings_from_past_key_values``: the first P positions of a batch-1 transformers cache (a
    ``Cache``, or a tuple of per-layer ``(keys, values)``, each ``[1, K, S, D]``) as a flat table.

    Raises:
        ValueError: a batch other than 1, tensors of another rank, or fewer than P cached positions.
    """
    layers = getattr(past_key_values, "layers", None)
    pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else list(past_key_values)
    if not pairs or any(k.dim() != 4 or k.shape[0] != 1 or v.shape != k.shape for k, v in pairs):
        raise ValueError(
            "past_key_values: expected the cache of one sequence, per layer keys and values of shape [1, K, S, D]. "
            "Fix: prefill the text alone (batch 1) with use_cache=True."
        )
    keys = torch.stack([k[0] for k, _ in pairs])  # [L, K, S, D]
    values = torch.stack([v[0] for _, v in pairs])
    return table_from_key_values(keys, values, num_virtual_tokens)


# ------------------------------------------------------------------ building, loading, composing


def empty(config: CartridgeConfig, shape: BaseModelShape) -> CartridgeCache:
    """The cartridge's structure (N(0, 1) values), about to receive stored weights."""
    return CartridgeCache(config, shape.prefix_width)


def build(config: CartridgeConfig, base_model: PreTrainedModel, tokenizer: Any | None = None) -> CartridgeCache:
    """The cartridge on the base's device: from ``config.init_text``'s prefill, or N(0, 1)."""
    shape = family_of(base_model.config).shape(base_model.config)
    device = base_model.get_input_embeddings().weight.device
    check_fits_in_memory(config, shape.prefix_width, device)
    table = None
    if config.init_text is not None:
        table = table_from_text(base_model, tokenizer, config.init_text, config.num_virtual_tokens,
                                config.use_chat_template)
    with torch.device(device):
        return CartridgeCache(config, shape.prefix_width, table)


def from_table(config: CartridgeConfig, shape: BaseModelShape, table: torch.Tensor) -> CartridgeCache:
    """A stored ``[P, L * 2 * K * D]`` cartridge (PEFT's one ``prompt_embeddings``) as a module, split by F."""
    return CartridgeCache(config, shape.prefix_width, table.float())


def compose(configs: Sequence[CartridgeConfig], tables: Sequence[torch.Tensor]) -> tuple[CartridgeConfig, torch.Tensor]:
    """Several cartridges as one: their tables concatenated in order, the first one's frozen count kept (PEFT's
    ``compose_cartridge_adapters``: one attention sink in front).

    Args:
        configs: each cartridge's configuration.
        tables: each cartridge's ``[P_i, L * 2 * K * D]`` table.

    Returns:
        The composed configuration (``num_virtual_tokens = sum P_i``) and its ``[sum P_i, L * 2 * K * D]`` table.

    Raises:
        ValueError: fewer than two cartridges, or tables of different widths (made for other bases).
    """
    if len(configs) < 2 or len(configs) != len(tables):
        raise ValueError(f"compose: {len(configs)} configs and {len(tables)} tables: expected two or more cartridges, "
                         "one table each. Fix: pass every cartridge to compose, in order.")
    widths = sorted({table.shape[1] for table in tables})
    if len(widths) > 1:
        raise ValueError(f"compose: tables of widths {widths}: expected cartridges of one base model (one width "
                         "L * 2 * K * D). Fix: compose cartridges trained on the same base.")
    table = torch.cat([table.float() for table in tables], dim=0)
    return CartridgeConfig(num_virtual_tokens=table.shape[0], num_frozen_tokens=configs[0].num_frozen_tokens), table


def enter(module: nn.Module, request: EntryRequest) -> KeyValues:
    """The cache, split into every layer's keys and values ``[L, K, P, D]``."""
    return KeyValues(*split_key_values(module(), request.shape))


def reference_forward(
    base_model: PreTrainedModel,
    flat_cache: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """A cartridge as PEFT hands it over: the cache of P tokens the model has already seen, built and passed
    exactly as a prefix-tuning table (`softprompt.methods.prefix_tuning.reference_forward`); the plain reference
    the engine is tested against.

    Args:
        base_model: the frozen transformers causal LM.
        flat_cache: ``[P, L * 2 * K * D]``, the cartridge module's output.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]`` (-100 where no loss is wanted) or None.

    Returns:
        The base model's output: ``.logits [B, T, V]`` and ``.loss``.
    """
    return prefix_reference_forward(base_model, flat_cache, input_ids, attention_mask, labels)


METHOD = MethodSpec(
    name="cartridge",
    cli_name="cartridge",
    config_class=CartridgeConfig,
    enters_as="key_values",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="CARTRIDGE",
    peft_fields=("num_virtual_tokens", "num_frozen_tokens"),
    default_num_virtual_tokens=20,
    peft_module=from_prompt_embeddings(from_table),
    paper=Paper("Eyuboglu et al.", 2025, "2506.06266",
                "Cartridges: Lightweight and general-purpose long context representations via self-study"),
    trains="a `[P - F, L·2·K·D]` table of keys and values after F frozen ones (F = `num_frozen_tokens`, "
           "counted in all params)",
    reference_forward=reference_forward,
)
