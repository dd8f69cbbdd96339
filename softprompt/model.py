"""`SoftPromptModel`: a frozen causal LM and its soft-prompt adapters, joined only at the model's public seams.

The base model is frozen and never changed (`softprompt.frozen`); the adapters are ordinary modules kept beside it,
one per name, each built by its method (``softprompt/methods/``). A call goes down one way: the inputs checked and
the row layout built once (`softprompt.rows`); each present adapter's entry from its method's ``enter``; a route
through the frozen model: `forward` in PEFT's layout (`softprompt.routes`), `compute_loss` with the LM head at
labelled positions only (`softprompt.training_loss`), `generate` through transformers' own (`softprompt.generation`).
Every route gives the real tokens the positions they have alone (`softprompt.positions`).

Shapes: B batch, T tokens, P virtual tokens, V vocab.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from softprompt import generation, pretrained
from softprompt.entries import Entry, EntryRequest
from softprompt.families.family import BaseModelShape, Family
from softprompt.frozen import FrozenModel
from softprompt.inputs import (
    check_adapter_names_argument,
    check_forward_options,
    check_generate_options,
    check_labels,
    check_left_padded,
    check_loaded_names,
    check_loss_implementation,
    check_model_inputs,
    check_new_adapter_name,
    check_some_label,
    check_task_ids,
)
from softprompt.loss import LossImplementation
from softprompt.methods import SoftPromptConfig, method_of
from softprompt.routes import full_logits
from softprompt.rows import RowLayout
from softprompt.training_loss import (
    VirtualTokenLayout,
    check_loss_choices,
    labelled_counts,
    layout_for,
    reduced_loss,
)

BASE_MODEL_PREFIX = "base_model."
"""Where the frozen base's tensors would sit in the state dict (they never do: `state_dict` is the adapters)."""


class SoftPromptModel(nn.Module):
    """A frozen causal LM with one or more soft-prompt adapters.

    Args:
        base_model: a transformers causal LM of a supported family (``AutoModelForCausalLM.from_pretrained(...)``).
            All of its parameters are frozen here; it is otherwise left untouched.
        config: the first adapter's configuration (any method's, e.g. `PromptTuningConfig`).
        tokenizer: needed only for inits that start from tokens (TEXT, SAMPLE_VOCAB); it is not kept.
        adapter_name: the first adapter's name.

    Raises:
        TypeError: `base_model` is not a transformers model.
        UnsupportedModelError: its family is not supported (the message lists the supported ones).

    Example: ``SoftPromptModel(base, PromptTuningConfig(num_virtual_tokens=8)).compute_loss(ids, mask, labels)``.
    """

    accepts_loss_kwargs = False
    """For transformers.Trainer: `forward`'s loss is a mean over its own batch (it ignores ``num_items_in_batch``),
    so Trainer divides it by the gradient-accumulation steps itself."""

    def __init__(
        self, base_model: PreTrainedModel, config: SoftPromptConfig, tokenizer: Any | None = None,
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
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(
                f"base_model={type(base_model).__name__}: expected a transformers causal LM. "
                "Fix: SoftPromptModel(AutoModelForCausalLM.from_pretrained(name_or_path), config)."
            )
        self.frozen = FrozenModel(base_model)
        self.base_model = base_model  # a submodule, so that .to(device) moves it; never in the state dict
        self.prompts = nn.ModuleDict()
        """The adapters' trainable modules, by adapter name."""
        self.adapter_configs: dict[str, SoftPromptConfig] = {}
        """The adapters' configurations, by adapter name."""
        self._active_adapter = adapter_name

    @property
    def family(self) -> Family:
        """The base model's family record."""
        return self.frozen.family

    @property
    def shape(self) -> BaseModelShape:
        """The base model's dimensions."""
        return self.frozen.shape

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self, adapter_name: str, config: SoftPromptConfig, tokenizer: Any | None = None, module: nn.Module | None = None
    ) -> None:
        """Adds a new adapter on the same frozen base (it does not become active; see `set_adapter`).

        Args:
            adapter_name: a name not yet used.
            config: the method's configuration.
            tokenizer: for inits that start from tokens.
            module: an already built module for `config` (used by the loaders); built fresh when None.

        Raises:
            ValueError: the name is taken or not a valid name, or `config` is no method's configuration.
        """
        check_new_adapter_name(adapter_name, self.prompts)
        spec = method_of(config)
        if module is None:
            module = spec.build(config, self.base_model, tokenizer)
        self.prompts[adapter_name] = module
        # A copy: a caller who edits their config object afterwards must not change what this adapter records.
        self.adapter_configs[adapter_name] = copy.deepcopy(config)

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the adapter used when no ``adapter_names`` are given; it becomes trainable, every
        other adapter is frozen (as in PEFT).

        Raises:
            ValueError: `adapter_name` is not a loaded adapter's name.
        """
        check_loaded_names([adapter_name], self.prompts, allow_none=False)
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
        """Checks that every name (None, the base model alone, aside) is a loaded adapter (`check_loaded_names`)."""
        check_loaded_names(names, self.prompts)

    def row_layout(self, batch_size: int, adapter_names: Sequence[str | None] | None) -> RowLayout:
        """Every row's adapter (the active one when `adapter_names` is None) and where it sits in the batch.

        Raises:
            ValueError: not one name per row, a single string, or an unknown name.
        """
        names = check_adapter_names_argument(adapter_names, batch_size, self._active_adapter)
        self.check_adapter_names(names)
        specs = {name: method_of(self.adapter_configs[name]) for name in names if name is not None}
        lengths = {name: spec.num_slots(self.adapter_configs[name]) for name, spec in specs.items()}
        return RowLayout.of(names, lengths, kinds={name: spec.enters_as for name, spec in specs.items()})

    def _prepare(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, adapter_names: Any, task_ids: Any,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RowLayout, dict[str, Entry]]:
        """Every call's first steps: the inputs checked, the mask (all ones when None), the row layout (built once)
        and each present adapter's entry (its method's ``enter``)."""
        check_model_inputs(self.base_model, input_ids, attention_mask)
        if labels is not None:
            check_labels(self.base_model, labels, input_ids)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return (attention_mask, *self.layout_and_entries(input_ids.shape[0], adapter_names, task_ids))

    def layout_and_entries(self, batch_size: int, adapter_names: Any, task_ids: Any) -> tuple[RowLayout, dict]:
        """The row layout and each present adapter's entry, for losses written outside this class (distillation)."""
        layout = self.row_layout(batch_size, adapter_names)
        task_ids = check_task_ids(task_ids, batch_size)
        entries = {}
        for name in layout.adapters:
            rows = layout.rows_of(name)
            request = EntryRequest(rows=len(rows), task_ids=None if task_ids is None else task_ids[rows],
                                   base_model=self.base_model, family=self.family, shape=self.shape)
            entries[name] = method_of(self.adapter_configs[name]).enter(self.prompts[name], request)
        return layout, entries

    # ------------------------------------------------------------------ forward and loss

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Runs the base model with the prompts injected; full logits, like a transformers causal LM.

        Args:
            input_ids: ``[B, T]`` token ids (left or right padded).
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; all ones when None.
            labels: ``[B, T]`` next-token labels (-100 where no loss is wanted), or None.
            adapter_names: one adapter name (or None for the base model alone) per row; the active adapter for
                every row when None.
            task_ids: ``[B]`` each row's task, for adapters with one prompt per task (multitask prompt tuning).
            **kwargs: ignored extra keys that training frameworks pass (e.g. ``num_items_in_batch``); model
                inputs this method cannot honour (``inputs_embeds``, the cache, ...) are refused.

        Returns:
            ``.loss`` (mean cross-entropy over the labelled positions, or None) and ``.logits [B, T, V]`` for the
            real positions only. As in PEFT, a last virtual token predicts the first real token (``labels[:, 0]``).

        Raises:
            ValueError: a model input among ``kwargs`` that would be dropped, mismatched shapes, an unknown adapter
                name, or inputs longer than the model can attend to.
        """
        check_forward_options(kwargs)
        attention_mask, layout, entries = self._prepare(input_ids, attention_mask, adapter_names, task_ids, labels)
        loss, logits = full_logits(self.frozen, layout, entries, input_ids, attention_mask, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        adapter_names: Sequence[str | None] | None = None,
        implementation: LossImplementation = "torch",
        virtual_token_layout: VirtualTokenLayout = "auto",
        reduction: str = "mean",
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss: the same value and gradients as ``forward(...).loss`` (within rounding), for much
        less work: the LM head at labelled positions only, virtual tokens once per prompt where that pays, all-padding
        columns dropped (``softprompt/training_loss.py`` says how, and why each is exact).

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]`` or None.
            labels: ``[B, T]``, -100 where no loss is wanted.
            adapter_names: per-row adapters, as in `forward`.
            implementation: ``"torch"``, ``"triton"`` (the fused kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``)
                or ``"full"`` (`forward`'s full logits, the reference); see `softprompt.loss`.
            virtual_token_layout: ``"auto"`` (`softprompt.training_loss.choose_layout`), ``"prefix"`` (virtual
                tokens once per prompt, as keys and values) or ``"sequence"`` (in front of every row, one pass).
            reduction: ``"mean"`` over the batch's labelled positions; ``"sum"``; ``"per_row"``: ``[B]`` each row's
                sum; or ``"adapter_mean"``: the value is the batch mean, but each adapter's gradient is that of the
                mean over its own positions, as if its rows were trained alone (`softprompt.multi_task`).
            task_ids: ``[B]`` each row's task, as in `forward`.

        Returns:
            The scalar loss (``[B]`` for ``per_row``; fp32, fp64 for a float64 model).

        Raises:
            ValueError: mismatched shapes, an unknown adapter name, implementation, layout or reduction, a mean over
                no labelled position, or inputs longer than the model can attend to.
        """
        check_loss_choices(implementation, virtual_token_layout, reduction)
        if implementation == "full" and reduction == "mean":  # the reference: forward's own loss
            check_some_label(self.labelled_positions(labels, adapter_names, task_ids).sum())
            return self.forward(input_ids, attention_mask, labels, adapter_names, task_ids=task_ids).loss
        return self._loss(input_ids, attention_mask, labels, adapter_names, implementation, virtual_token_layout,
                          task_ids, reduction)[0]

    def summed_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        adapter_names: Sequence[str | None] | None = None,
        implementation: LossImplementation = "torch",
        virtual_token_layout: VirtualTokenLayout = "auto",
        task_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`compute_loss` summed over the labelled positions, and how many each row has: what a training step
        needs to normalize over all its micro-batches and processes (`softprompt.training.optimizer_step`).

        Returns:
            (the scalar sum, ``[B]`` the labelled positions of each row, as `labelled_positions` counts them).
        """
        check_loss_choices(implementation, virtual_token_layout, "sum")
        return self._loss(input_ids, attention_mask, labels, adapter_names, implementation, virtual_token_layout,
                          task_ids, "sum")

    def _loss(self, input_ids, attention_mask, labels, adapter_names, implementation, virtual_token_layout, task_ids,
              reduction) -> tuple[torch.Tensor, torch.Tensor]:
        if implementation == "full":
            raise ValueError(f"implementation='full' with reduction={reduction!r}: the full-logits reference "
                             "computes the mean only. Fix: implementation='torch'.")
        attention_mask, layout, entries = self._prepare(input_ids, attention_mask, adapter_names, task_ids, labels)
        check_loss_implementation(implementation, input_ids.device)
        if virtual_token_layout == "auto":
            virtual_token_layout = layout_for(self.frozen, layout, input_ids.device)
        return reduced_loss(self.frozen, layout, entries, input_ids, attention_mask, labels, implementation,
                            virtual_token_layout, reduction)

    def labelled_positions(
        self, labels: torch.Tensor, adapter_names: Sequence[str | None] | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]`` how many positions of each row carry a loss: its labels (the first token only when a virtual token
        comes before it) and its adapter's own virtual-token labels (CPT)."""
        with torch.no_grad():
            layout, entries = self.layout_and_entries(labels.shape[0], adapter_names, task_ids)
        return labelled_counts(layout, entries, labels)

    def compile_decoder(self, **compile_options: Any) -> None:
        """Runs the training loss's passes through the frozen decoder with ``torch.compile`` (options passed on:
        ``mode="reduce-overhead"`` replays them as CUDA graphs); see `softprompt.frozen.FrozenModel.compile`."""
        self.frozen.compile(**compile_options)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        task_ids: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor | ModelOutput:
        """Generates with transformers' ``generate``, every row's adapter acting through a key/value prefix (or
        inside attention).

        Args:
            input_ids: ``[B, T]``, left-padded when rows differ in length.
            attention_mask: ``[B, T]``; all ones when None.
            adapter_names: per-row adapters, as in `forward`.
            task_ids: ``[B]`` each row's task, as in `forward`.
            **generate_kwargs: passed to transformers (``max_new_tokens``, ``do_sample``, ``num_beams``,
                ``repetition_penalty``, ``eos_token_id``, ``num_return_sequences``, ...).

        Returns:
            ``[B * num_return_sequences, T + new]``: the input ids followed by the new ids; never virtual ids. With
            ``return_dict_in_generate=True``, transformers' output object, whose ``sequences`` are that tensor.

        Raises:
            ValueError: ``inputs_embeds`` among the options, an unknown adapter name, a row that is not
                left-padded, or prompt + text + new tokens longer than the model can attend to.
        """
        check_generate_options(generate_kwargs)
        with torch.no_grad():
            attention_mask, layout, entries = self._prepare(input_ids, attention_mask, adapter_names, task_ids)
        check_left_padded(attention_mask)
        return generation.generate(self.frozen, layout, entries, input_ids, attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------ parameters

    def num_parameters(self, exclude_embeddings: bool | None = None) -> tuple[int, int] | int:
        """Returns (trainable, total) parameter counts; shared (tied) parameters count once, as in PEFT.

        Args:
            exclude_embeddings: when given, the base model's own int count, as transformers defines it (for callers
                of ``PreTrainedModel.num_parameters``: ``transformers.Trainer`` estimates FLOPs with it).
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

    # ------------------------------------------------------------------ state dict, saving and loading

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The adapters' tensors (``prompts.<name>.*``), never the frozen base's: what a plain
        ``transformers.Trainer`` checkpoints and reloads for a model that is not a ``PreTrainedModel``."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [key for key in state if key.startswith(prefix + BASE_MODEL_PREFIX)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        """Loads what `state_dict` returns; the frozen base's tensors may be absent (and are not reported missing).

        Raises:
            RuntimeError: with `strict`, naming the missing adapter tensors and the unexpected keys.
        """
        result = nn.Module.load_state_dict(self, state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.startswith(BASE_MODEL_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, unexpected keys "
                f"{result.unexpected_keys}. Fix: load a state dict of a model with the same adapters (same names and "
                "configs), or pass strict=False."
            )
        result.missing_keys[:] = missing
        return result

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        format: str = "softprompt", is_main_process: bool = True) -> Path:
        """Saves every adapter (or `selected_adapters`) in softprompt's format or ``format="peft"``: ``default``
        at the top of the directory, any other in a subdirectory of its name (`pretrained.save_pretrained`)."""
        return pretrained.save_pretrained(self, save_directory, selected_adapters, format, is_main_process)

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
        ``subfolder``, ``local_files_only`` (`softprompt.hub.HubOptions`), and ``format`` to accept one format
        only."""
        check_new_adapter_name(adapter_name, self.prompts)  # before anything is fetched
        config, module = pretrained.read_pretrained(self.base_model, model_id, **hub_options)
        module.requires_grad_(is_trainable)
        self.add_adapter(adapter_name, config, module=module)

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
        pretrained.check_base_model(base_model)
        check_new_adapter_name(adapter_name, ())
        config, module = pretrained.read_pretrained(base_model, model_id, **hub_options)
        module.requires_grad_(is_trainable)
        return cls.from_module(base_model, config, module, adapter_name)

    # The one-format names of earlier versions (the README used them): they work, and warn with the replacement.

    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Deprecated: `save_pretrained`."""
        _deprecated("save_adapter(directory)", "save_pretrained(directory)")
        return pretrained.save_one(self, directory, adapter_name, "softprompt")

    def save_peft_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Deprecated: ``save_pretrained(directory, format="peft")``."""
        _deprecated("save_peft_adapter(directory)", 'save_pretrained(directory, format="peft")')
        return pretrained.save_one(self, directory, adapter_name, "peft")

    @classmethod
    def from_adapter(cls, base_model: PreTrainedModel, directory: str | Path, **options: Any) -> "SoftPromptModel":
        """Deprecated: `from_pretrained`."""
        _deprecated("SoftPromptModel.from_adapter", "SoftPromptModel.from_pretrained")
        return cls.from_pretrained(base_model, directory, format="softprompt", **options)

    @classmethod
    def from_peft_adapter(cls, base_model: PreTrainedModel, directory: str | Path, **options: Any) -> "SoftPromptModel":
        """Deprecated: `from_pretrained`."""
        _deprecated("SoftPromptModel.from_peft_adapter", "SoftPromptModel.from_pretrained")
        return cls.from_pretrained(base_model, directory, format="peft", **options)


def load_peft_adapter(base_model: PreTrainedModel, peft_directory: str | Path, **options: Any) -> SoftPromptModel:
    """Deprecated: `SoftPromptModel.from_pretrained`."""
    _deprecated("softprompt.load_peft_adapter", "SoftPromptModel.from_pretrained")
    return SoftPromptModel.from_pretrained(base_model, peft_directory, format="peft", **options)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new}, PEFT's name, which does the same.", DeprecationWarning,
                  stacklevel=3)
