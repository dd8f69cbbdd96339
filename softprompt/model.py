"""`SoftPromptModel`: a frozen causal LM plus trainable soft prompts, joined only at the model's public seams.

The base model (a transformers `BloomForCausalLM`) is frozen and its weights are never changed; the soft prompts are
ordinary `nn.Module`s kept beside it (composition), so that an adapter's state dict is all there is to save. A few
calls set a switch on the base model for their own duration and restore it in a ``finally``: gradient-checkpointing
flags (`checkpointed_layers_read_cache`, the virtual-token pass of `compute_loss`) and, in `generate` on CPU, the
output head (swapped through transformers' public ``set_output_embeddings``). Each method lives in its own file:

- prompt tuning: ``softprompt/prompt_tuning.py`` -> virtual-token embeddings ``[P, C]``
- p-tuning: ``softprompt/p_tuning.py`` -> virtual-token embeddings ``[P, C]`` (from an MLP or LSTM encoder)
- prefix tuning: ``softprompt/prefix_tuning.py`` -> per-layer keys and values ``[L, H, P, D]``

and reaches the model through one of two seams:

- virtual-token embeddings are concatenated in front of the input's token embeddings (``inputs_embeds``), the
  attention mask gets P ones in front, the labels P times -100 (PEFT's layout);
- prefix keys and values go in through ``past_key_values`` as a read-only `PrefixCache`, and the attention mask gets
  P ones in front.

Every row of a batch may carry its own adapter (``adapter_names``), of any method and length, or none. Rows are
aligned by left-padding each row's virtual tokens and prefix with slots that the attention mask hides. BLOOM derives
its ALiBi positions from ``cumsum(attention_mask) - 1``, so hidden slots do not shift any position, and masked keys
get exactly zero attention weight: each row computes what it would compute alone.

Generation turns every adapter into a key/value prefix: the virtual tokens of prompt tuning and p-tuning come first
and attention is causal, so their keys and values do not depend on the input and can be computed once per call.
transformers' own ``generate`` then continues from that cache, which keeps every decoding option (greedy, sampling,
beams, repetition penalty) and returns only real token ids.

Shapes: B batch, T tokens, P virtual tokens, L layers, H heads, D head dim, C hidden, V vocab.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from softprompt.loss import (
    IGNORE_INDEX,
    LossImplementation,
    cross_entropy_from_logits,
    linear_cross_entropy,
    next_token_targets,
)
from softprompt.p_tuning import PromptEncoderConfig, build_prompt_encoder
from softprompt.prefix_tuning import (
    PrefixCache,
    PrefixTuningConfig,
    build_prefix_encoder,
    checkpointed_layers_read_cache,
    split_key_values,
)
from softprompt.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit, cycle_to_length
from softprompt.seams import NEW_CACHE_NAME, OLD_CACHE_NAME, cache_argument

SoftPromptConfig = Union[PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig]
"""Any of the three methods' configurations."""

VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning")
"""Methods whose prompt enters as input embeddings; the other one, prefix tuning, enters as keys and values."""

VirtualTokenLayout = Literal["prefix", "sequence"]
"""How `SoftPromptModel.compute_loss` feeds virtual tokens: once per adapter as a key/value prefix, or in front of
every row (see there)."""


@dataclass(frozen=True)
class BaseModelShape:
    """The dimensions of the frozen base model that an adapter depends on."""

    hidden_size: int
    """C."""
    num_layers: int
    """L."""
    num_heads: int
    """H."""
    vocab_size: int
    """V (rows of the embedding matrix)."""

    @classmethod
    def of(cls, base_model: PreTrainedModel) -> "BaseModelShape":
        """Reads the shape from a transformers model's config."""
        config = base_model.config
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            vocab_size=config.vocab_size,
        )

    @property
    def head_dim(self) -> int:
        """D = C / H."""
        return self.hidden_size // self.num_heads


def build_prompt_module(
    config: SoftPromptConfig,
    base_model: PreTrainedModel,
    tokenizer: Any | None = None,
) -> nn.Module:
    """Builds the trainable module of a method, initialized as its config says, in fp32 on the base's device.

    Args:
        config: the method's configuration.
        base_model: the frozen base model (for its shape and, for TEXT/SAMPLE_VOCAB init, its word embeddings).
        tokenizer: a transformers tokenizer; needed by TEXT and SAMPLE_VOCAB init only.

    Raises:
        ValueError: TEXT or SAMPLE_VOCAB init without a tokenizer, or an unknown config type.
    """
    shape = BaseModelShape.of(base_model)
    device = base_model.get_input_embeddings().weight.device
    with torch.device(device):
        if isinstance(config, PromptTuningConfig):
            init_ids = _prompt_tuning_init_ids(config, tokenizer)
            init_embeddings = None
            if init_ids is not None:
                word_embeddings = base_model.get_input_embeddings()
                init_embeddings = word_embeddings(torch.tensor(init_ids, device=device)).detach().float()
            return PromptEmbedding(config, shape.hidden_size, init_embeddings)
        if isinstance(config, PromptEncoderConfig):
            return build_prompt_encoder(config, shape.hidden_size)
        if isinstance(config, PrefixTuningConfig):
            return build_prefix_encoder(config, shape.num_layers, shape.hidden_size)
    raise ValueError(
        f"config of type {type(config).__name__}: expected PromptTuningConfig, PromptEncoderConfig or "
        "PrefixTuningConfig. Fix: build one of those (from softprompt import PromptTuningConfig, ...)."
    )


def _prompt_tuning_init_ids(config: PromptTuningConfig, tokenizer: Any | None) -> list[int] | None:
    """The token ids whose embeddings start the table, or None for RANDOM init."""
    if config.prompt_tuning_init is PromptTuningInit.RANDOM:
        return None
    if tokenizer is None:
        raise ValueError(
            f"prompt_tuning_init={config.prompt_tuning_init.value} needs a tokenizer, got tokenizer=None. "
            "Fix: SoftPromptModel(base_model, config, tokenizer=AutoTokenizer.from_pretrained(...)), "
            "or use prompt_tuning_init='RANDOM'."
        )
    if config.prompt_tuning_init is PromptTuningInit.TEXT:
        # With special tokens, as PEFT tokenizes it (BLOOM's tokenizer adds none).
        return cycle_to_length(tokenizer(config.prompt_tuning_init_text)["input_ids"], config.num_virtual_tokens)
    # SAMPLE_VOCAB: only ids the tokenizer produces, so that no never-trained embedding row is drawn.
    special_ids = set(tokenizer.all_special_ids)
    producible = sorted(set(tokenizer.get_vocab().values()) - special_ids)
    picks = torch.randint(len(producible), (config.num_virtual_tokens,), device="cpu")
    return [producible[i] for i in picks.tolist()]


_INPUTS_FORWARD_CANNOT_TAKE = frozenset(
    {"inputs_embeds", OLD_CACHE_NAME, NEW_CACHE_NAME, "position_ids", "cache_position", "output_attentions",
     "output_hidden_states"}
)
"""Keyword arguments of a transformers causal LM that `SoftPromptModel.forward` refuses rather than drop."""


class SoftPromptModel(nn.Module):
    """A frozen causal LM with one or more soft-prompt adapters.

    Args:
        base_model: a transformers causal LM (BLOOM: ``AutoModelForCausalLM.from_pretrained(...)``). All of its
            parameters are frozen here; it is otherwise left untouched.
        config: the first adapter's configuration (`PromptTuningConfig`, `PromptEncoderConfig` or
            `PrefixTuningConfig`).
        tokenizer: needed only for TEXT and SAMPLE_VOCAB prompt-tuning init; it is not kept.
        adapter_name: the first adapter's name.

    Example:
        >>> model = SoftPromptModel(base_model, PromptTuningConfig(num_virtual_tokens=8))
        >>> loss = model.compute_loss(input_ids, attention_mask, labels)
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        config: SoftPromptConfig,
        tokenizer: Any | None = None,
        adapter_name: str = "default",
    ):
        super().__init__()
        self._attach_base_model(base_model, adapter_name)
        self.add_adapter(adapter_name, config, tokenizer=tokenizer)

    def _attach_base_model(self, base_model: PreTrainedModel, adapter_name: str) -> None:
        """Everything but the first adapter: the frozen base, its shape, the adapter tables, the decoder passes."""
        self.base_model = base_model
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(False)
        self.shape = BaseModelShape.of(base_model)
        self.prompts = nn.ModuleDict()
        """The adapters' trainable modules, by adapter name."""
        self.adapter_configs: dict[str, SoftPromptConfig] = {}
        """The adapters' configurations, by adapter name."""
        self._active_adapter = adapter_name
        # Compiled versions of compute_loss's two passes through the frozen decoder (see `compile_decoder`).
        self._compiled_run_decoder: Callable[..., torch.Tensor] | None = None
        self._compiled_run_virtual_tokens: Callable[..., tuple[torch.Tensor, ...]] | None = None

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        adapter_name: str,
        config: SoftPromptConfig,
        tokenizer: Any | None = None,
        module: nn.Module | None = None,
    ) -> None:
        """Adds a new adapter on the same frozen base (it does not become active; see `set_adapter`).

        Args:
            adapter_name: a name not yet used.
            config: the method's configuration.
            tokenizer: for TEXT / SAMPLE_VOCAB init.
            module: an already built module for `config` (used by the loaders); built fresh when None.

        Raises:
            ValueError: the name is taken or not a valid module name.
        """
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(
                f"adapter_name={adapter_name!r}: expected a non-empty string without '.'. Fix: e.g. 'complaints'."
            )
        if adapter_name in self.prompts:
            raise ValueError(
                f"adapter_name={adapter_name!r} is already loaded (loaded: {sorted(self.prompts)}). "
                "Fix: pick another name."
            )
        self.prompts[adapter_name] = module if module is not None else build_prompt_module(
            config, self.base_model, tokenizer
        )
        # A copy: a caller who edits their config object afterwards must not change what this adapter records.
        self.adapter_configs[adapter_name] = copy.deepcopy(config)

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the adapter used when no ``adapter_names`` are given; it becomes trainable, every
        other adapter is frozen (as in PEFT)."""
        self.check_adapter_names([adapter_name])
        self._active_adapter = adapter_name
        for name, module in self.prompts.items():
            module.requires_grad_(name == adapter_name)

    @property
    def active_adapter(self) -> str:
        """The name of the adapter used when no ``adapter_names`` are given."""
        return self._active_adapter

    @property
    def active_config(self) -> SoftPromptConfig:
        """The active adapter's configuration."""
        return self.adapter_configs[self._active_adapter]

    def check_adapter_names(self, names: Iterable[str | None]) -> None:
        """Checks that every name (None, the base model alone, aside) is a loaded adapter.

        Raises:
            ValueError: naming the unknown names and the loaded ones.
        """
        unknown = sorted({name for name in names if name is not None and name not in self.prompts})
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) {unknown}: loaded adapters are {sorted(self.prompts)} "
                "(None means the base model alone). Fix: load_adapter(directory, name) first, or fix the name."
            )

    def _row_adapters(self, batch_size: int, adapter_names: Sequence[str | None] | None) -> list[str | None]:
        if adapter_names is None:
            return [self._active_adapter] * batch_size
        if isinstance(adapter_names, str):
            raise ValueError(
                f"adapter_names={adapter_names!r}: expected a list with one name per row (None for the base model "
                f"alone), got a single string. Fix: adapter_names=[{adapter_names!r}] * {batch_size}."
            )
        names = list(adapter_names)
        if len(names) != batch_size:
            raise ValueError(
                f"adapter_names has {len(names)} entries for a batch of {batch_size} rows: expected one name per "
                "row (None for the base model alone)."
            )
        self.check_adapter_names(names)
        return names

    # ------------------------------------------------------------------ injection

    def _injected_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        adapter_names: Sequence[str | None] | None,
    ) -> tuple[dict[str, Any], int]:
        """The base model's keyword arguments with the prompts injected, and the number of virtual positions.

        Returns:
            (kwargs for the base model: ``inputs_embeds [B, P_e + T, C]``, ``attention_mask [B, P_k + P_e + T]``,
            ``past_key_values`` or None; P_e, the virtual positions in front of the real tokens), where P_e is the
            longest virtual-token prompt in the batch and P_k the longest prefix.
        """
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}: expected the shape of input_ids "
                f"{tuple(input_ids.shape)}."
            )
        names = self._row_adapters(batch_size, adapter_names)
        token_embeddings = self.base_model.get_input_embeddings()(input_ids)  # [B, T, C]
        rows_of = {name: [row for row, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
        rows_of.pop(None, None)

        virtual_lengths = {n: self.adapter_configs[n].num_virtual_tokens for n in rows_of if self._is_virtual(n)}
        prefix_lengths = {n: self.adapter_configs[n].num_virtual_tokens for n in rows_of if not self._is_virtual(n)}
        num_virtual = max(virtual_lengths.values(), default=0)  # P_e
        num_prefix = max(prefix_lengths.values(), default=0)  # P_k

        # Virtual-token slots, left-padded per row with hidden (mask 0) slots: [B, P_e, C] and [B, P_e].
        virtual = token_embeddings.new_zeros(batch_size, num_virtual, self.shape.hidden_size)
        virtual_mask = attention_mask.new_zeros(batch_size, num_virtual)
        for name, length in virtual_lengths.items():
            rows = torch.tensor(rows_of[name], device=input_ids.device)
            embeddings = self.prompts[name]().to(token_embeddings.dtype)  # [P, C]
            virtual[rows, num_virtual - length :] = embeddings
            virtual_mask[rows, num_virtual - length :] = 1

        # Prefix slots, likewise: keys and values [L, B, H, P_k, D], mask [B, P_k].
        prefix_mask = attention_mask.new_zeros(batch_size, num_prefix)
        past_key_values = None
        if num_prefix:
            slots = (self.shape.num_layers, batch_size, self.shape.num_heads, num_prefix, self.shape.head_dim)
            keys = token_embeddings.new_zeros(slots)
            values = token_embeddings.new_zeros(slots)
            for name, length in prefix_lengths.items():
                rows = torch.tensor(rows_of[name], device=input_ids.device)
                layer_keys, layer_values = self._prefix_key_values(name)  # each [L, H, P, D]
                keys[:, rows, :, num_prefix - length :] = layer_keys.unsqueeze(1).to(keys.dtype)
                values[:, rows, :, num_prefix - length :] = layer_values.unsqueeze(1).to(values.dtype)
                prefix_mask[rows, num_prefix - length :] = 1
            past_key_values = PrefixCache(keys, values)

        inputs = {
            "inputs_embeds": torch.cat([virtual, token_embeddings], dim=1),  # [B, P_e + T, C]
            "attention_mask": torch.cat([prefix_mask, virtual_mask, attention_mask], dim=1),  # [B, P_k + P_e + T]
            **cache_argument(self.base_model, past_key_values),
        }
        return inputs, num_virtual

    @staticmethod
    def _loss_targets(labels: torch.Tensor, inputs: dict[str, Any], num_virtual: int) -> torch.Tensor:
        """Next-token targets ``[B, P_e + T]`` of the injected sequence; hidden virtual slots predict nothing.

        The last virtual slot predicts the first real token. In a row whose adapter has no virtual tokens (prefix
        tuning, or none) that slot is hidden padding that does not exist when the row runs alone, where nothing
        scores the first token: it must not score it in a mixed batch either.
        """
        targets = next_token_targets(labels, num_virtual)  # [B, P_e + T]
        slots = inputs["attention_mask"][:, -targets.shape[1] :]  # [B, P_e + T], without the prefix's P_k
        hidden_virtual = slots == 0
        hidden_virtual[:, num_virtual:] = False  # real-token padding keeps PEFT's targets
        return targets.masked_fill(hidden_virtual, IGNORE_INDEX)

    def _is_virtual(self, adapter_name: str) -> bool:
        return self.adapter_configs[adapter_name].method in VIRTUAL_TOKEN_METHODS

    def _prefix_key_values(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefix-tuning adapter's keys and values, each ``[L, H, P, D]``."""
        return split_key_values(self.prompts[adapter_name](), self.shape.num_layers, self.shape.num_heads)

    # ------------------------------------------------------------------ forward and loss

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Runs the base model with the prompts injected; full logits, like a transformers causal LM.

        Args:
            input_ids: ``[B, T]`` token ids (left or right padded).
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; all ones when None.
            labels: ``[B, T]`` next-token labels (-100 where no loss is wanted), or None.
            adapter_names: one adapter name (or None for the base model alone) per row; the active adapter for
                every row when None.
            **kwargs: ignored extra keys that training frameworks pass (e.g. ``num_items_in_batch``); model
                inputs this method cannot honour (``inputs_embeds``, ``past_key_values``, ...) are refused.

        Returns:
            ``.loss`` (mean cross-entropy over the labelled positions, or None) and ``.logits [B, T, V]`` for the
            real positions only. As in PEFT, with prompt tuning and p-tuning the last virtual token predicts the
            first real token, so ``labels[:, 0]`` counts when it is not -100.

        Raises:
            ValueError: a model input among ``kwargs`` that would be silently dropped, shapes that do not match, or
                an unknown adapter name.
        """
        refused = sorted(set(kwargs) & _INPUTS_FORWARD_CANNOT_TAKE)
        if refused:
            raise ValueError(
                f"SoftPromptModel.forward got {', '.join(refused)}: it builds the embeddings, the cache and the "
                "positions itself from input_ids and attention_mask, so these would be ignored. Fix: pass input_ids "
                "(and attention_mask); for decoding use SoftPromptModel.generate."
            )
        inputs, num_virtual = self._injected_inputs(input_ids, attention_mask, adapter_names)
        with checkpointed_layers_read_cache(self.base_model):
            output = self.base_model(**inputs, use_cache=False)
        logits = output.logits  # [B, P_e + T, V]
        loss = None
        if labels is not None:
            loss = cross_entropy_from_logits(logits, self._loss_targets(labels, inputs, num_virtual))
        return CausalLMOutputWithPast(loss=loss, logits=logits[:, num_virtual:])

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        adapter_names: Sequence[str | None] | None = None,
        implementation: LossImplementation = "torch",
        virtual_token_layout: VirtualTokenLayout = "prefix",
    ) -> torch.Tensor:
        """The training loss: the same value and gradients as ``forward(...).loss`` (within fp32 rounding), for
        much less work.

        Three exact savings (``tests/test_compute_loss.py`` checks each against the full-logits path):

        - The LM head runs only at the labelled positions: in the classification recipes that is 2-4 of each
          row's 64 positions, and the head is nearly half of a BLOOM forward pass.
        - Virtual tokens (prompt tuning, p-tuning) are computed once per adapter, not once per row. They come
          first and attention is causal, so their keys and values do not depend on the input: one batch-1 pass of
          the P virtual tokens gives them, and the batch then runs with them as a key/value prefix, the way prefix
          tuning does (B * T positions instead of B * (P + T)). The last virtual token, which predicts the first
          real token, comes from that pass too.
        - Columns that are padding in every row are dropped when no scored prediction depends on them.

        With dropout in a base model in training mode (BLOOM's is 0.0) the virtual tokens share one dropout mask
        across rows, where the full path draws one per row.

        ``virtual_token_layout="sequence"`` keeps only the first saving: the virtual tokens stay in front of every
        row, as in `forward` and PEFT (B * (P + T) positions), in one pass through the decoder instead of two. It
        is for steps bound by kernel launches rather than arithmetic, e.g. a small batch on a GPU without
        `compile_decoder`, where the extra batch-1 pass costs as much CPU time as the whole batch.

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]`` or None.
            labels: ``[B, T]``, -100 where no loss is wanted.
            adapter_names: per-row adapters, as in `forward`.
            implementation: ``"torch"`` (LM head on the labelled rows, plain logits ``[N, V]`` for the N labelled
                positions), ``"triton"`` (the fused kernel, never holding ``[N, V]`` fp32 logits; CUDA, or CPU under
                ``TRITON_INTERPRET=1``) or ``"full"`` (`forward`'s full logits, the reference).
            virtual_token_layout: ``"prefix"`` (virtual tokens computed once per adapter, then a key/value
                prefix) or ``"sequence"`` (in front of every row, one decoder pass); see above.

        Returns:
            The scalar mean loss (fp32); NaN when no label is set, like `forward`.

        Raises:
            ValueError: shapes that do not match, an unknown adapter name or implementation.
        """
        # Both choices are checked before any work, so that a typo does not cost a decoder pass first.
        if implementation not in ("full", "torch", "triton"):
            raise ValueError(
                f"implementation={implementation!r}: expected 'torch', 'triton' or 'full'. Fix: 'torch' (CPU or "
                "GPU), 'triton' (the fused kernel, GPU), 'full' (the full-logits reference)."
            )
        if virtual_token_layout not in ("prefix", "sequence"):
            raise ValueError(
                f"virtual_token_layout={virtual_token_layout!r}: expected 'prefix' or 'sequence'. Fix: 'prefix' "
                "(fewer FLOPs) unless the step is bound by GPU kernel launches, then 'sequence'."
            )
        if implementation == "full":
            return self.forward(input_ids, attention_mask, labels, adapter_names).loss
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape or labels.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
                f"{tuple(labels.shape)}: expected one shape [B, T] for all three."
            )
        head = self.base_model.get_output_embeddings()
        if virtual_token_layout == "sequence":
            inputs, num_virtual = self._injected_inputs(input_ids, attention_mask, adapter_names)
            with checkpointed_layers_read_cache(self.base_model):
                hidden_states = self.base_model.get_decoder()(**inputs, use_cache=False).last_hidden_state
            targets = self._loss_targets(labels, inputs, num_virtual)  # [B, P_e + T]
            selected = targets != IGNORE_INDEX
            return linear_cross_entropy(hidden_states[selected], targets[selected], head.weight, implementation)
        names = self._row_adapters(input_ids.shape[0], adapter_names)
        # The last virtual token predicts the first real token (PEFT's layout); rows without virtual tokens score
        # nothing there (see `_loss_targets`). Taken before padding columns may be dropped.
        has_virtual = [n is not None and self._is_virtual(n) for n in names]
        first_targets = labels[:, 0]  # [B]
        if not all(has_virtual):  # (a device tensor built from a list waits for the GPU: only when needed)
            first_targets = first_targets.masked_fill(~torch.tensor(has_virtual, device=labels.device), IGNORE_INDEX)
        input_ids, attention_mask, labels = self._without_padding_columns(input_ids, attention_mask, labels)

        token_embeddings = self.base_model.get_input_embeddings()(input_ids)  # [B, T, C]
        past_key_values, prefix_mask, last_virtual = self._prompts_as_prefix(names, token_embeddings.dtype)
        with checkpointed_layers_read_cache(self.base_model):
            hidden_states = (self._compiled_run_decoder or self._run_decoder)(
                token_embeddings,
                torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1),  # [B, P + T]
                past_key_values,
            )  # [B, T, C]

        targets = next_token_targets(labels, 0)  # [B, T]
        selected = targets != IGNORE_INDEX
        rows = torch.cat([last_virtual[first_targets != IGNORE_INDEX], hidden_states[selected]])  # [N, C]
        row_targets = torch.cat([first_targets[first_targets != IGNORE_INDEX], targets[selected]])  # [N]
        return linear_cross_entropy(rows, row_targets, head.weight, implementation)

    @staticmethod
    def _without_padding_columns(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drops the leading and trailing columns that are padding in every row and whose loss terms are all -100.

        A column hidden in every row is a key no real token attends to, and it does not move ALiBi positions
        (``cumsum(mask) - 1``); what it computes matters only through the label it predicts. Column j predicts
        ``labels[:, j + 1]`` (``labels[:, 0]`` is predicted by the virtual tokens, which stay), so leading columns
        ``0..k-1`` go when ``labels[:, 1..k]`` are all -100, and trailing columns ``j..`` when ``labels[:, j..]`` are.

        Returns:
            The three ``[B, T']`` tensors (views), T' <= T.
        """
        num_tokens = input_ids.shape[1]
        real = (attention_mask != 0).any(dim=0)  # [T]
        scored = (labels != IGNORE_INDEX).any(dim=0)  # [T]
        if not bool(real.any()):
            return input_ids, attention_mask, labels
        real_columns = real.nonzero().flatten()
        scored_after_first = scored[1:].nonzero().flatten() + 1
        scored_columns = scored.nonzero().flatten()
        first_scored = int(scored_after_first[0]) if len(scored_after_first) else num_tokens
        start = min(int(real_columns[0]), first_scored - 1)
        stop = max(int(real_columns[-1]), int(scored_columns[-1]) if len(scored_columns) else -1) + 1
        if start == 0 and stop == num_tokens:
            return input_ids, attention_mask, labels
        return input_ids[:, start:stop], attention_mask[:, start:stop], labels[:, start:stop]

    def _prompts_as_prefix(
        self, names: Sequence[str | None], dtype: torch.dtype
    ) -> tuple[PrefixCache | None, torch.Tensor, torch.Tensor]:
        """Every row's adapter as a key/value prefix, with gradients, left-padded with hidden slots.

        Args:
            names: one adapter name (or None) per row.
            dtype: the dtype of the base model's activations.

        Returns:
            (the `PrefixCache` or None when no row has an adapter, its mask ``[B, P]``, and the final hidden state
            of each row's last virtual token ``[B, C]``, zeros for rows without virtual tokens).
        """
        batch_size = len(names)
        device = self.base_model.get_input_embeddings().weight.device
        distinct = [name for name in dict.fromkeys(names) if name is not None]
        lengths = {name: self.adapter_configs[name].num_virtual_tokens for name in distinct}
        num_prefix = max(lengths.values(), default=0)  # P
        mask = torch.zeros(batch_size, num_prefix, dtype=torch.long, device=device)
        last_virtual = torch.zeros(batch_size, self.shape.hidden_size, dtype=dtype, device=device)
        if not distinct:
            return None, mask, last_virtual
        if len(distinct) == 1 and None not in names:
            # One adapter for the whole batch: broadcast views, no [L, B, H, P, D] copy and no row index tensors
            # (building one from a list would make the CPU wait for the GPU in the middle of the step).
            mask.fill_(1)
            if self._is_virtual(distinct[0]):
                keys, values, last = self._virtual_tokens_key_values(distinct[0], dtype)
                last_virtual = last.to(dtype).expand(batch_size, -1)
            else:
                keys, values = self._prefix_key_values(distinct[0])
            return PrefixCache(keys.to(dtype), values.to(dtype), batch_size=batch_size), mask, last_virtual
        key_values = {}
        for name in distinct:
            if self._is_virtual(name):
                keys, values, last = self._virtual_tokens_key_values(name, dtype)
                rows = torch.tensor([row for row, n in enumerate(names) if n == name], device=device)
                last_virtual = last_virtual.index_copy(0, rows, last.to(dtype).expand(len(rows), -1))
            else:
                keys, values = self._prefix_key_values(name)
            key_values[name] = (keys.to(dtype), values.to(dtype))  # each [L, H, P_name, D]
        slots = (self.shape.num_layers, batch_size, self.shape.num_heads, num_prefix, self.shape.head_dim)
        all_keys = torch.zeros(slots, dtype=dtype, device=device)
        all_values = torch.zeros(slots, dtype=dtype, device=device)
        for name, (keys, values) in key_values.items():
            rows = torch.tensor([row for row, n in enumerate(names) if n == name], device=device)
            length = lengths[name]
            all_keys[:, rows, :, num_prefix - length :] = keys.unsqueeze(1)
            all_values[:, rows, :, num_prefix - length :] = values.unsqueeze(1)
            mask[rows, num_prefix - length :] = 1
        return PrefixCache(all_keys, all_values), mask, last_virtual

    def _virtual_tokens_key_values(
        self, adapter_name: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch-1 pass of a virtual-token adapter's P tokens (positions 0..P-1, as in the full sequence).

        Returns:
            keys and values ``[L, H, P, D]`` and the final hidden state of the last virtual token ``[C]``, all
            carrying gradients to the adapter.
        """
        embeddings = self.prompts[adapter_name]().to(dtype)  # [P, C]
        decoder = self.base_model.get_decoder()
        # The cache must be filled, and this pass is P tokens long: nothing to gain from checkpointing it, and
        # checkpointed layers would drop the cache.
        paused = [module for module in decoder.modules() if getattr(module, "gradient_checkpointing", False) is True]
        for module in paused:
            module.gradient_checkpointing = False
        try:
            return (self._compiled_run_virtual_tokens or self._run_virtual_tokens)(embeddings)
        finally:
            for module in paused:
                module.gradient_checkpointing = True

    def _run_decoder(
        self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor, prefix: PrefixCache | None
    ) -> torch.Tensor:
        """The frozen decoder over ``[B, T, C]`` embeddings after a key/value prefix; final hidden states
        ``[B, T, C]``. ``attention_mask`` is ``[B, P + T]``."""
        decoder = self.base_model.get_decoder()
        return decoder(
            inputs_embeds=token_embeddings, attention_mask=attention_mask, use_cache=False,
            **cache_argument(decoder, prefix),
        ).last_hidden_state

    def _run_virtual_tokens(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen decoder over ``[P, C]`` virtual-token embeddings as a batch of one: their keys and values
        ``[L, H, P, D]`` and the last one's final hidden state ``[C]``."""
        cache = DynamicCache(config=self.base_model.config)
        decoder = self.base_model.get_decoder()
        output = decoder(
            inputs_embeds=embeddings.unsqueeze(0),  # [1, P, C]
            attention_mask=torch.ones(1, embeddings.shape[0], dtype=torch.long, device=embeddings.device),
            use_cache=True,
            **cache_argument(decoder, cache),
        )
        keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, P, D]
        values = torch.stack([layer.values[0] for layer in cache.layers])
        return keys, values, output.last_hidden_state[0, -1]

    def compile_decoder(self, **compile_options: Any) -> None:
        """Runs `compute_loss`'s passes through the frozen decoder with ``torch.compile`` (forward and backward).

        On a GPU a small batch of a model like bloomz-560m is bound by kernel launches, not by arithmetic:
        transformers' eager BLOOM issues thousands of small kernels per step. Compiling fuses the elementwise
        work, and ``mode="reduce-overhead"`` replays the step as CUDA graphs. The first step of each new batch
        shape compiles (seconds to minutes), so this pays off for long runs of similar shapes;
        ``benchmarks/train_step.py --compile`` measures it. The base model object is not replaced or wrapped: only
        this model's two decoder-pass methods are compiled.

        Args:
            **compile_options: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ...).
        """
        self._compiled_run_decoder = torch.compile(self._run_decoder, **compile_options)
        self._compiled_run_virtual_tokens = torch.compile(self._run_virtual_tokens, **compile_options)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generation_prefix(
        self, adapter_names: Sequence[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's adapter as a key/value prefix, left-padded with hidden slots to a common length.

        The same prefix as the training path (`_prompts_as_prefix`): virtual tokens come first and attention is
        causal, so their keys and values do not depend on the input and one pass of the P virtual tokens alone
        gives them.

        Args:
            adapter_names: one name (or None) per row.

        Returns:
            keys and values, each ``[L, B, H, P_max, D]`` in the base model's dtype, and the mask ``[B, P_max]``.
        """
        dtype = self.base_model.get_input_embeddings().weight.dtype
        prefix, mask, _ = self._prompts_as_prefix(adapter_names, dtype)
        if prefix is None:  # no row has an adapter: an empty prefix
            empty = (self.shape.num_layers, len(adapter_names), self.shape.num_heads, 0, self.shape.head_dim)
            keys = torch.zeros(empty, dtype=dtype, device=mask.device)
            return keys, keys.clone(), mask
        keys = torch.stack([layer.keys for layer in prefix.layers])  # [L, B, H, P_max, D]
        values = torch.stack([layer.values for layer in prefix.layers])
        return keys, values, mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor | ModelOutput:
        """Generates with transformers' ``generate``, the adapters acting through a key/value prefix.

        Args:
            input_ids: ``[B, T]``, left-padded when rows differ in length.
            attention_mask: ``[B, T]``; all ones when None.
            adapter_names: per-row adapters, as in `forward`.
            **generate_kwargs: passed to transformers (``max_new_tokens``, ``do_sample``, ``num_beams``,
                ``repetition_penalty``, ``eos_token_id``, ``num_return_sequences``, ...).

        Returns:
            ``[B * num_return_sequences, T + new]``: the input ids followed by the new ids; never virtual ids. With
            ``return_dict_in_generate=True``, transformers' output object, whose ``sequences`` are that tensor
            (and ``scores`` / ``logits`` per step when asked for).
        """
        if "inputs_embeds" in generate_kwargs:
            raise ValueError(
                "generate(inputs_embeds=...) is not supported: pass input_ids, the adapters add the soft prompt."
            )
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        names = self._row_adapters(batch_size, adapter_names)
        keys, values, prefix_mask = self.generation_prefix(names)  # [L, B, H, P, D], [B, P]
        # generate() repeats every row of the inputs this many times (beams / return sequences) but cannot know
        # how to repeat a cache it is handed, so the cache is repeated the same way here.
        generation_config = generate_kwargs.get("generation_config", self.base_model.generation_config)
        num_beams = generate_kwargs.get("num_beams", generation_config.num_beams) or 1
        num_sequences = generate_kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1
        repeats = max(num_beams, num_sequences)
        cache = DynamicCache(config=self.base_model.config)
        for layer in range(self.shape.num_layers):
            cache.update(
                keys[layer].repeat_interleave(repeats, dim=0),  # [B * repeats, H, P, D]
                values[layer].repeat_interleave(repeats, dim=0),
                layer,
            )
        with _cpu_head_with_weight_on_the_left(self.base_model):
            return self.base_model.generate(
                input_ids=input_ids,
                attention_mask=torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1),  # [B, P+T]
                **cache_argument(self.base_model, cache),
                **generate_kwargs,
            )

    # ------------------------------------------------------------------ parameters

    def num_parameters(self, exclude_embeddings: bool | None = None) -> tuple[int, int] | int:
        """Returns (trainable, total) parameter counts; shared (tied) parameters count once, as in PEFT.

        Args:
            exclude_embeddings: only for callers that expect transformers' ``PreTrainedModel.num_parameters``
                (``transformers.Trainer`` estimates FLOPs with it): when given, the base model's own int count is
                returned, as transformers defines it.
        """
        if exclude_embeddings is not None:
            return self.base_model.num_parameters(exclude_embeddings=exclude_embeddings)
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def trainable_parameters_summary(self) -> str:
        """PEFT's wording: ``trainable params: 8,192 || all params: 559,222,784 || trainable%: 0.0015``."""
        trainable, total = self.num_parameters()
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> None:
        """Prints `trainable_parameters_summary` (the one printing method, kept for PEFT users' habits)."""
        print(self.trainable_parameters_summary())  # noqa: T201

    def base_state_fingerprint(self) -> str:
        """A hash of every base-model tensor: equal before and after training proves the base was not touched."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.base_model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ saving and loading

    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Saves one adapter (default: the active one) in softprompt's format; see ``softprompt/adapter_format.py``.

        Returns:
            The directory written.
        """
        from softprompt.adapter_format import save_adapter

        name = adapter_name or self._active_adapter
        self.check_adapter_names([name])
        return save_adapter(
            directory,
            self.adapter_configs[name],
            self.prompts[name],
            base_model=self.base_model,
        )

    def load_adapter(self, directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Loads an adapter saved by `save_adapter` beside the ones already loaded (one copy of the base).

        Args:
            directory: the adapter directory.
            adapter_name: the name it gets here.
            is_trainable: leave its parameters trainable (to resume training); frozen otherwise, as in PEFT.
        """
        from softprompt.adapter_format import load_adapter_module

        config, module = load_adapter_module(directory, self.base_model)
        module.requires_grad_(is_trainable)
        self.add_adapter(adapter_name, config, module=module)

    @classmethod
    def from_adapter(
        cls,
        base_model: PreTrainedModel,
        directory: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> "SoftPromptModel":
        """Builds a model from a saved adapter, bit-exactly as it was saved.

        Args:
            base_model: the frozen base the adapter was trained on (its shape is checked).
            directory: the adapter directory written by `save_adapter`.
            adapter_name: the name it gets.
            is_trainable: leave its parameters trainable (to resume training); frozen otherwise, as in PEFT.

        Raises:
            AdapterFormatError: a missing, truncated or corrupt file, or an adapter for another base shape.
        """
        from softprompt.adapter_format import load_adapter_module

        config, module = load_adapter_module(directory, base_model)
        module.requires_grad_(is_trainable)
        return cls._from_module(base_model, config, module, adapter_name)

    @classmethod
    def _from_module(
        cls, base_model: PreTrainedModel, config: SoftPromptConfig, module: nn.Module, adapter_name: str
    ) -> "SoftPromptModel":
        """A model whose first adapter is an already built `module` (no fresh initialization, no RNG use)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._attach_base_model(base_model, adapter_name)
        model.add_adapter(adapter_name, config, module=module)
        return model

    def save_peft_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Writes the adapter in PEFT's format, which ``peft.PeftModel.from_pretrained`` loads.

        PEFT keeps only the virtual tokens / prefix (the encoder's output), so what it loads can be used but not
        trained further the same way; keep `save_adapter` for that.
        """
        from softprompt.peft_format import save_peft_adapter

        name = adapter_name or self._active_adapter
        self.check_adapter_names([name])
        return save_peft_adapter(directory, self.adapter_configs[name], self.prompts[name], self.base_model)


class _HeadWithWeightOnTheLeft(nn.Module):
    """An LM head computed as ``(W @ h.T).T``, block by block: the same product as ``h @ W.T``, a faster form on CPU.

    At each decoding step the head multiplies B rows by BLOOM's ``[250880, C]`` weight. CPU BLAS runs that skinny
    product faster with the big weight as the left operand. Its result, ``[V, B]``, is the transpose of the logits:
    returned as a transposed view, it makes every later step of decoding slow (transformers copies the last
    position's logits to fp32, keeping the strides, and takes the argmax along the strided axis). So the vocabulary
    is done in blocks of `block_rows` rows of W, each block's small ``[block_rows, B]`` result transposed into a
    contiguous ``[B, V]`` output while it is still in cache (2048 rows: on 2 cores, 64 rows, blocks of 1024 to 32768
    rows took 0.224 to 0.261 s, 2048 within about 2% of the best for 8 and for 64 rows). ``benchmarks/head_product.py``
    measures the three forms with what greedy decoding does next. It shares the weight; nothing is copied.
    """

    def __init__(self, head: nn.Linear, block_rows: int = 2048):
        super().__init__()
        self.head = head
        self.block_rows = block_rows

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight  # [V, C]
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B * T, C]
        logits = rows.new_empty(rows.shape[0], weight.shape[0])  # [B * T, V]
        for start in range(0, weight.shape[0], self.block_rows):
            block = slice(start, start + self.block_rows)
            logits[:, block] = torch.mm(weight[block], rows.t()).t()  # [B * T, block_rows]
        if self.head.bias is not None:
            logits += self.head.bias
        return logits.reshape(*hidden_states.shape[:-1], weight.shape[0])  # [B, T, V]


@contextmanager
def _cpu_head_with_weight_on_the_left(base_model: PreTrainedModel) -> Iterator[None]:
    """While generating on CPU, the base model's head is `_HeadWithWeightOnTheLeft` (through transformers'
    public ``set_output_embeddings``); the original head is put back afterwards, whatever happens."""
    head = base_model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        yield
        return
    base_model.set_output_embeddings(_HeadWithWeightOnTheLeft(head))
    try:
        yield
    finally:
        base_model.set_output_embeddings(head)


def materialize(module: nn.Module) -> torch.Tensor:
    """The tensor an adapter contributes, with its encoder applied: ``[P, C]`` or ``[P, L * 2 * C]``, fp32."""
    with torch.no_grad():
        return module().detach().to(torch.float32, copy=True)  # a copy: never aliases a parameter


__all__ = [
    "BaseModelShape",
    "SoftPromptConfig",
    "SoftPromptModel",
    "build_prompt_module",
    "materialize",
]
