"""`SoftPromptModel`: a frozen causal LM and its soft-prompt adapters, joined only at the model's public seams.

The base model (any supported transformers causal LM, `softprompt.families`) is frozen and its weights are never
changed; the adapters are ordinary modules kept beside it (composition), so that an adapter's state dict is all
there is to save. Each method lives in its own file (``softprompt/methods/``) and enters through one of two seams:

- ``embeddings`` (prompt tuning, p-tuning): ``[P, C]`` virtual tokens in front of the input's token embeddings;
- ``key_values`` (prefix tuning): ``[L, K, P, D]`` keys and values per layer, through a read-only cache
  (``softprompt/prefix_cache.py``).

This engine computes what each method's plain reference (``reference_forward`` in its file) computes, with less
work, for batches whose rows may carry different adapters (``adapter_names``; `softprompt.rows`): `forward` in the
reference's layout (``softprompt/injection.py``), `compute_loss` with every adapter as a key/value prefix and the
head at labelled positions only (``softprompt/training_loss.py``), `generate` through transformers' own
``generate`` (``softprompt/generation.py``).

Every route gives the real tokens the positions they have alone (`softprompt.positions`). A few calls set a switch
on the base model for their own duration and restore it in a ``finally``: the checkpointed layers' cache switch
(`checkpointed_layers_read_cache`), the checkpointing flag during the short virtual-token pass, and the CPU head
during generation.

Shapes: B batch, T tokens, P virtual tokens, L layers, K key/value heads, D head dim, C embedding width, V vocab.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from softprompt import generation, module_state, pretrained
from softprompt.families import family_of
from softprompt.injection import sequence_inputs, sequence_targets
from softprompt.inputs import check_labels
from softprompt.loss import LossImplementation, cross_entropy_from_logits
from softprompt.methods import SoftPromptConfig, method_of
from softprompt.positions import position_inputs
from softprompt.prefix_cache import PrefixCache, checkpointed_layers_read_cache
from softprompt.rows import RowLayout, check_new_adapter_name
from softprompt.seams import NEW_CACHE_NAME, OLD_CACHE_NAME, cache_argument
from softprompt.training_loss import VirtualTokenLayout, training_loss

LOSS_IMPLEMENTATIONS: tuple[str, ...] = get_args(LossImplementation)
VIRTUAL_TOKEN_LAYOUTS: tuple[str, ...] = get_args(VirtualTokenLayout)

_INPUTS_FORWARD_CANNOT_TAKE = frozenset(
    {"inputs_embeds", OLD_CACHE_NAME, NEW_CACHE_NAME, "position_ids", "cache_position", "output_attentions",
     "output_hidden_states"}
)
"""Keyword arguments of a transformers causal LM that `SoftPromptModel.forward` refuses rather than drop."""


class SoftPromptModel(nn.Module):
    """A frozen causal LM with one or more soft-prompt adapters.

    Args:
        base_model: a transformers causal LM of a supported family (``AutoModelForCausalLM.from_pretrained(...)``).
            All of its parameters are frozen here; it is otherwise left untouched.
        config: the first adapter's configuration (`PromptTuningConfig`, `PromptEncoderConfig` or
            `PrefixTuningConfig`).
        tokenizer: needed only for TEXT and SAMPLE_VOCAB prompt-tuning init; it is not kept.
        adapter_name: the first adapter's name.

    Raises:
        TypeError: `base_model` is not a transformers model.
        UnsupportedModelError: its family is not supported (the message lists the supported ones).

    Example:
        >>> model = SoftPromptModel(base_model, PromptTuningConfig(num_virtual_tokens=8))
        >>> loss = model.compute_loss(input_ids, attention_mask, labels)
    """

    accepts_loss_kwargs = False
    """For transformers.Trainer: `forward`'s loss is a mean over its own batch (it ignores ``num_items_in_batch``),
    so Trainer divides it by the gradient-accumulation steps itself."""

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

    @classmethod
    def from_module(
        cls, base_model: PreTrainedModel, config: SoftPromptConfig, module: nn.Module, adapter_name: str = "default"
    ) -> "SoftPromptModel":
        """A model whose first adapter is an already built `module` (no fresh initialization, no RNG use)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._attach_base_model(base_model, adapter_name)
        model.add_adapter(adapter_name, config, module=module)
        return model

    def _attach_base_model(self, base_model: PreTrainedModel, adapter_name: str) -> None:
        """Everything but the first adapter: the frozen base, its family and shape, the adapter tables."""
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(
                f"base_model={type(base_model).__name__}: expected a transformers causal LM. "
                "Fix: SoftPromptModel(AutoModelForCausalLM.from_pretrained(name_or_path), config)."
            )
        self.family = family_of(base_model.config)
        self.base_model = base_model
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(False)
        self.shape = self.family.shape(base_model.config)
        self.prompts = nn.ModuleDict()
        """The adapters' trainable modules, by adapter name."""
        self.adapter_configs: dict[str, SoftPromptConfig] = {}
        """The adapters' configurations, by adapter name."""
        self._active_adapter = adapter_name
        # Compiled versions of compute_loss's two passes through the frozen decoder (see `compile_decoder`).
        self._compiled_decoder_pass: Callable[..., torch.Tensor] | None = None
        self._compiled_virtual_token_pass: Callable[..., tuple[torch.Tensor, ...]] | None = None

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self, adapter_name: str, config: SoftPromptConfig, tokenizer: Any | None = None, module: nn.Module | None = None
    ) -> None:
        """Adds a new adapter on the same frozen base (it does not become active; see `set_adapter`).

        Args:
            adapter_name: a name not yet used.
            config: the method's configuration.
            tokenizer: for TEXT / SAMPLE_VOCAB init.
            module: an already built module for `config` (used by the loaders); built fresh when None.

        Raises:
            ValueError: the name is taken or not a valid module name, or `config` is no method's configuration.
        """
        check_new_adapter_name(adapter_name, self.prompts)
        spec = method_of(config)
        if module is None:
            module = spec.build(config, self.shape, self.base_model.get_input_embeddings(), tokenizer)
        self.prompts[adapter_name] = module
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

    def row_layout(self, batch_size: int, adapter_names: Sequence[str | None] | None) -> RowLayout:
        """Every row's adapter (the active one when `adapter_names` is None) and where it sits in the batch.

        Raises:
            ValueError: not one name per row, a single string, or an unknown name.
        """
        if adapter_names is None:
            names: list[str | None] = [self._active_adapter] * batch_size
        elif isinstance(adapter_names, str):
            raise ValueError(
                f"adapter_names={adapter_names!r}: expected a list with one name per row (None for the base model "
                f"alone), got a single string. Fix: adapter_names=[{adapter_names!r}] * {batch_size}."
            )
        else:
            names = list(adapter_names)
            if len(names) != batch_size:
                raise ValueError(
                    f"adapter_names has {len(names)} entries for a batch of {batch_size} rows: expected one name per "
                    "row (None for the base model alone)."
                )
            self.check_adapter_names(names)
        present = {name for name in names if name is not None}
        return RowLayout.of(
            names,
            lengths={name: self.adapter_configs[name].num_virtual_tokens for name in present},
            seams={name: method_of(self.adapter_configs[name]).enters_as for name in present},
        )

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
                inputs this method cannot honour (``inputs_embeds``, the cache, ...) are refused.

        Returns:
            ``.loss`` (mean cross-entropy over the labelled positions, or None) and ``.logits [B, T, V]`` for the
            real positions only. As in PEFT, with prompt tuning and p-tuning the last virtual token predicts the
            first real token, so ``labels[:, 0]`` counts when it is not -100.

        Raises:
            ValueError: a model input among ``kwargs`` that would be silently dropped, shapes that do not match, an
                unknown adapter name, or inputs longer than the model can attend to (`check_positions`).
        """
        refused = sorted(set(kwargs) & _INPUTS_FORWARD_CANNOT_TAKE)
        if refused:
            raise ValueError(
                f"SoftPromptModel.forward got {', '.join(refused)}: it builds the embeddings, the cache and the "
                "positions itself from input_ids and attention_mask, so these would be ignored. Fix: pass input_ids "
                "(and attention_mask); for decoding use SoftPromptModel.generate."
            )
        inputs, num_virtual = sequence_inputs(self, input_ids, attention_mask, adapter_names)
        if labels is not None:
            check_labels(self.base_model, labels, input_ids)
        with checkpointed_layers_read_cache(self.base_model):
            output = self.base_model(**inputs, use_cache=False)
        logits = output.logits  # [B, P_e + T, V]
        loss = None
        if labels is not None:
            loss = cross_entropy_from_logits(logits, sequence_targets(labels, inputs["attention_mask"], num_virtual))
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
        much less work: the LM head at labelled positions only, virtual tokens once per adapter as a key/value
        prefix, all-padding columns dropped (``softprompt/training_loss.py`` says how, and why each is exact).
        With dropout in a base in training mode, virtual tokens then share one dropout mask across rows.

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]`` or None.
            labels: ``[B, T]``, -100 where no loss is wanted.
            adapter_names: per-row adapters, as in `forward`.
            implementation: ``"torch"``, ``"triton"`` (the fused kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``)
                or ``"full"`` (`forward`'s full logits, the reference); see `softprompt.loss`.
            virtual_token_layout: ``"prefix"``, or ``"sequence"`` (virtual tokens in front of every row, as in
                `forward`, in one decoder pass instead of two: for steps bound by kernel launches).

        Returns:
            The scalar mean loss (fp32); NaN when no label is set, like `forward`.

        Raises:
            ValueError: shapes that do not match, an unknown adapter name, implementation or layout, or inputs
                longer than the model can attend to.
        """
        # Both choices are checked before any work, so that a typo does not cost a decoder pass first.
        if implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r}: expected 'torch', 'triton' or 'full'. Fix: 'torch' (CPU or "
                "GPU), 'triton' (the fused kernel, GPU), 'full' (the full-logits reference)."
            )
        if virtual_token_layout not in VIRTUAL_TOKEN_LAYOUTS:
            raise ValueError(
                f"virtual_token_layout={virtual_token_layout!r}: expected 'prefix' or 'sequence'. Fix: 'prefix' "
                "(fewer FLOPs) unless the step is bound by GPU kernel launches, then 'sequence'."
            )
        if implementation == "full":
            return self.forward(input_ids, attention_mask, labels, adapter_names).loss
        return training_loss(self, input_ids, attention_mask, labels, adapter_names, implementation, virtual_token_layout)

    def decoder_pass(
        self,
        token_embeddings: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixCache | None,
        positions: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The frozen decoder over ``[B, T, C]`` embeddings after a key/value prefix: final hidden states
        ``[B, T, C]``. ``attention_mask`` is ``[B, P + T]``, `positions` the family's position arguments."""
        run = self._compiled_decoder_pass or self._eager_decoder_pass
        return run(token_embeddings, attention_mask, prefix, positions)

    def _eager_decoder_pass(self, token_embeddings, attention_mask, prefix, positions) -> torch.Tensor:
        decoder = self.base_model.get_decoder()
        return decoder(
            inputs_embeds=token_embeddings, attention_mask=attention_mask, use_cache=False,
            **cache_argument(decoder, prefix), **positions,
        ).last_hidden_state

    def virtual_token_pass(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen decoder over ``[P, C]`` virtual-token embeddings as a batch of one, at positions 0..P-1:
        their keys and values ``[L, K, P, D]`` and the last one's final hidden state ``[C]``."""
        return (self._compiled_virtual_token_pass or self._eager_virtual_token_pass)(embeddings)

    def _eager_virtual_token_pass(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=self.base_model.config)
        decoder = self.base_model.get_decoder()
        mask = torch.ones(1, embeddings.shape[0], dtype=torch.long, device=embeddings.device)  # [1, P]
        output = decoder(
            inputs_embeds=embeddings.unsqueeze(0),  # [1, P, C]
            attention_mask=mask,
            use_cache=True,
            **cache_argument(decoder, cache),
            **position_inputs(self.family, mask, embeddings.shape[0]),
        )
        keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, K, P, D]
        values = torch.stack([layer.values[0] for layer in cache.layers])
        return keys, values, output.last_hidden_state[0, -1]

    def compile_decoder(self, **compile_options: Any) -> None:
        """Runs `compute_loss`'s two passes through the frozen decoder with ``torch.compile`` (forward, backward).

        For steps bound by kernel launches rather than arithmetic (small batches on a GPU); ``mode="reduce-overhead"``
        replays them as CUDA graphs. Each new batch shape compiles first. The base model is not replaced or wrapped.

        Args:
            **compile_options: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ...).
        """
        self._compiled_decoder_pass = torch.compile(self._eager_decoder_pass, **compile_options)
        self._compiled_virtual_token_pass = torch.compile(self._eager_virtual_token_pass, **compile_options)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor | ModelOutput:
        """Generates with transformers' ``generate``, every row's adapter acting through a key/value prefix.

        Args:
            input_ids: ``[B, T]``, left-padded when rows differ in length.
            attention_mask: ``[B, T]``; all ones when None.
            adapter_names: per-row adapters, as in `forward`.
            **generate_kwargs: passed to transformers (``max_new_tokens``, ``do_sample``, ``num_beams``,
                ``repetition_penalty``, ``eos_token_id``, ``num_return_sequences``, ...).

        Returns:
            ``[B * num_return_sequences, T + new]``: the input ids followed by the new ids; never virtual ids. With
            ``return_dict_in_generate=True``, transformers' output object, whose ``sequences`` are that tensor.

        Raises:
            ValueError: ``inputs_embeds`` among the options, an unknown adapter name, or prompt + text + new tokens
                longer than the model can attend to.
        """
        return generation.generate(self, input_ids, attention_mask, adapter_names, **generate_kwargs)

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
        digest = hashlib.sha256()
        for name, tensor in sorted(self.base_model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ state dict, saving and loading
    # PEFT's names; bodies in softprompt/pretrained.py (files, formats, hub) and softprompt/module_state.py.
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The adapters' tensors (``prompts.<name>.*``), never the frozen base's: what ``transformers.Trainer``
        checkpoints hold (``softprompt/module_state.py``). The base's own: ``base_model.state_dict()``."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return module_state.without_base_model(state, prefix)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        """Loads what `state_dict` returns: adapter tensors; the frozen base's may be absent (`module_state`)."""
        return module_state.load_adapter_state(self, state_dict, strict, assign)

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        format: str = "softprompt", is_main_process: bool = True) -> Path:
        """Saves every adapter (or `selected_adapters`) in softprompt's format or ``format="peft"``: ``default``
        at the top of the directory, any other in a subdirectory of its name (`pretrained.save_pretrained`)."""
        return pretrained.save_pretrained(self, save_directory, selected_adapters, format, is_main_process)

    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Saves one adapter (default: the active one) in softprompt's format at `directory` itself."""
        return pretrained.save_one(self, directory, adapter_name, "softprompt")

    def save_peft_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Saves one adapter in PEFT's format (``peft.PeftModel.from_pretrained`` loads it). PEFT keeps only the
        encoder's output, so what it loads can be used but not trained further the same way."""
        return pretrained.save_one(self, directory, adapter_name, "peft")

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Uploads what `save_pretrained` writes, with a model card, to the hub repository `repo_id`; options
        ``selected_adapters``, ``format``, ``commit_message``, ``private``, ``token``, ``revision``, ``create_pr``,
        ``write_model_card`` (`pretrained.push_to_hub`). Returns huggingface_hub's ``CommitInfo``."""
        return pretrained.push_to_hub(self, repo_id, **options)

    def load_adapter(
        self, model_id: str | Path, adapter_name: str, is_trainable: bool = False, **hub_options: Any
    ) -> None:
        """Adds an adapter beside the loaded ones (one copy of the base), from a directory or hub id, in either
        format; frozen unless `is_trainable`. `hub_options`: ``revision``, ``token``, ``cache_dir``,
        ``subfolder``, ``local_files_only`` (`softprompt.hub.HubOptions`)."""
        pretrained.load_adapter(self, model_id, adapter_name, is_trainable, **hub_options)

    @classmethod
    def from_pretrained(
        cls, base_model: PreTrainedModel, model_id: str | Path, adapter_name: str = "default",
        is_trainable: bool = False, **hub_options: Any,
    ) -> "SoftPromptModel":
        """A model on `base_model` (its shape is checked) with the adapter at `model_id`, a directory or hub id in
        either format, bit-exactly as saved; frozen unless `is_trainable`; `hub_options` as in `load_adapter`.

        Raises:
            AdapterFormatError: the adapter cannot be found or read, or was made for a base of another shape.
        """
        return pretrained.from_pretrained(cls, base_model, model_id, adapter_name, is_trainable, **hub_options)

    @classmethod
    def from_adapter(
        cls, base_model: PreTrainedModel, directory: str | Path, adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> "SoftPromptModel":
        """`from_pretrained` for softprompt's format only."""
        return pretrained.from_pretrained(cls, base_model, directory, adapter_name, is_trainable, ("softprompt",))

    @classmethod
    def from_peft_adapter(
        cls, base_model: PreTrainedModel, directory: str | Path, adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> "SoftPromptModel":
        """`from_pretrained` for PEFT's format only (``softprompt/peft_format.py``)."""
        return pretrained.from_pretrained(cls, base_model, directory, adapter_name, is_trainable, ("peft",))


def load_peft_adapter(
    base_model: PreTrainedModel, peft_directory: str | Path, adapter_name: str = "default", is_trainable: bool = False
) -> SoftPromptModel:
    """`SoftPromptModel.from_peft_adapter`: a model from a PEFT prompt-learning adapter directory."""
    return SoftPromptModel.from_peft_adapter(base_model, peft_directory, adapter_name, is_trainable)
