"""Checks of what a caller hands the model, made before any work: token ids, masks, labels, decoding options and
the loss implementation.

Without them a bad value surfaces deep inside the frozen model as an error that names none of the caller's inputs
(``IndexError: index out of range in self`` for a token id past the vocabulary, ``ZeroDivisionError`` for zero
beams, a reshape of 0 elements for an empty prompt), or is silently accepted (``top_p=2``). Every check here names
the value, what was expected and the fix, for the Python API and, through its ``ValueError``, for the command line.

The value-range checks cost one small device-to-host copy per call (the minimum and maximum of the ids), so the
tensors are never copied to the host whole.

Shapes: B batch, T tokens, V vocabulary (the base model's embedding rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from softprompt.seams import NEW_CACHE_NAME, OLD_CACHE_NAME

IGNORE_INDEX = -100
"""The label of a position without a loss (the transformers and PyTorch convention)."""

_INTEGER_DTYPES = (torch.int64, torch.int32)
"""What an embedding lookup takes as ids."""


def check_model_inputs(base_model: PreTrainedModel, input_ids: Any, attention_mask: Any) -> None:
    """Checks a batch of token ids and its attention mask against the base model.

    Args:
        base_model: the frozen base; its input embeddings give the vocabulary size V and the device.
        input_ids: expected a ``[B, T]`` integer tensor with B, T >= 1 and every id in ``[0, V)``.
        attention_mask: None, or a ``[B, T]`` tensor of 0s and 1s.

    Raises:
        ValueError: naming the argument, the value found, what was expected and the fix.
    """
    embeddings = base_model.get_input_embeddings()
    device = embeddings.weight.device
    _check_id_tensor("input_ids", input_ids, device)
    if input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}: expected at least one token per row (an empty prompt "
            "has nothing to continue or score). Fix: pass a non-empty text, e.g. --prompt 'Tweet text : hi Label : '."
        )
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask):
            raise ValueError(
                f"attention_mask of type {type(attention_mask).__name__}: expected a torch.Tensor of 0s and 1s shaped "
                "like input_ids. Fix: pass the tokenizer's attention_mask (return_tensors='pt'), or None."
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}: expected the shape of input_ids "
                f"{tuple(input_ids.shape)}. Fix: pass the mask the tokenizer returned with these ids."
            )
        if attention_mask.device != input_ids.device:
            raise ValueError(
                f"attention_mask is on {attention_mask.device} and input_ids on {input_ids.device}: expected one "
                f"device. Fix: attention_mask.to({str(input_ids.device)!r})."
            )
    vocab_size = embeddings.weight.shape[0]
    extremes = [input_ids.min(), input_ids.max()]
    if attention_mask is not None:
        extremes += [attention_mask.min(), attention_mask.max()]
    low, high, *mask_range = torch.stack([value.long() for value in extremes]).tolist()  # one host copy
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        row, position = (input_ids == bad).nonzero()[0].tolist()
        raise ValueError(
            f"input_ids holds the token id {bad} (row {row}, position {position}): expected ids in [0, {vocab_size}), "
            f"the base model's {vocab_size} embedding rows. Fix: encode with the base model's own tokenizer, and mark "
            "padding with attention_mask = 0 rather than with an id outside the vocabulary."
        )
    if mask_range and (mask_range[0] < 0 or mask_range[1] > 1):
        bad = mask_range[0] if mask_range[0] < 0 else mask_range[1]
        raise ValueError(
            f"attention_mask holds the value {bad}: expected 1 for real tokens and 0 for padding. Fix: pass the "
            "tokenizer's attention_mask."
        )


def check_labels(base_model: PreTrainedModel, labels: Any, input_ids: torch.Tensor) -> None:
    """Checks next-token labels: shaped like the ids, each a vocabulary id or -100.

    Args:
        base_model: the frozen base; its output embeddings (the LM head) give the number of classes.
        labels: expected a ``[B, T]`` integer tensor, on the ids' device.
        input_ids: the batch's ids (already checked).

    Raises:
        ValueError: naming the value, what was expected and the fix.
    """
    _check_id_tensor("labels", labels, input_ids.device)
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}: expected the shape of input_ids {tuple(input_ids.shape)}, one "
            "label per token (-100 where no loss is wanted). Fix: labels = input_ids.clone(), then set -100 on the "
            "prompt and padding."
        )
    head = base_model.get_output_embeddings()
    num_classes = head.weight.shape[0] if head is not None else base_model.get_input_embeddings().weight.shape[0]
    scored = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)  # -100 stands in as id 0
    low, high = torch.stack([scored.min(), scored.max()]).long().tolist()  # one host copy
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        row, position = (labels == bad).nonzero()[0].tolist()
        raise ValueError(
            f"labels holds {bad} (row {row}, position {position}): expected a token id in [0, {num_classes}) or "
            f"{IGNORE_INDEX} (no loss there). Fix: build labels from the base model's tokenizer ids, and use "
            f"{IGNORE_INDEX} for positions without a loss."
        )


def check_adapter_names_argument(adapter_names: Any, batch_size: int, active: str) -> list[str | None]:
    """One adapter name (or None, the base model alone) per row: `active` for every row when `adapter_names` is
    None.

    Raises:
        ValueError: a single string, or not one name per row.
    """
    if adapter_names is None:
        return [active] * batch_size
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
    return names


def check_loaded_names(names: Iterable[Any], loaded: Iterable[str], allow_none: bool = True) -> None:
    """Checks that every name is one of the `loaded` adapters' (or None, the base model alone, where allowed).

    Raises:
        ValueError: naming the unknown names and the loaded ones.
    """
    loaded = sorted(loaded)
    unknown = sorted({name for name in names if not (name is None and allow_none) and name not in loaded}, key=repr)
    if unknown:
        none = " (None means the base model alone)" if allow_none else ""
        raise ValueError(
            f"Unknown adapter name(s) {unknown}: loaded adapters are {loaded}{none}. Fix: load_adapter(directory, "
            "name) first, or fix the name."
        )


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Refuses a batch to generate from whose rows are not left-padded (padding, if any, before the real tokens).

    New tokens follow each row's last column: a right-padded row would continue after its padding, and its
    continuation would differ from the row's own.

    Raises:
        ValueError: naming the first such row and the fix.
    """
    after_real = attention_mask.diff(dim=1) < 0  # [B, T - 1]: a real token followed by a hidden one
    if bool(after_real.any()):
        row = int(after_real.any(dim=1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has padding after real tokens: generation continues every row from its last "
            "column, so a right-padded row would continue after its padding. Fix: pad on the left "
            "(tokenizer.padding_side = 'left', or AutoTokenizer.from_pretrained(..., padding_side='left'))."
        )


def check_some_label(labelled_positions: torch.Tensor) -> None:
    """Refuses a mean loss over a batch without a labelled position (a mean of nothing).

    Args:
        labelled_positions: the batch's count, a scalar tensor.

    Raises:
        ValueError: saying why and the fix.
    """
    if int(labelled_positions) == 0:
        raise ValueError(
            "The labels hold no labelled position (every label is -100, or only first tokens that nothing before "
            "them predicts): the mean loss would be NaN. Fix: label at least one token per batch; a training loop "
            "skips such a batch (softprompt's counts them), or use reduction='sum', which is 0 there."
        )


def check_task_ids(task_ids: Any, batch_size: int) -> torch.Tensor | None:
    """Each row's task id (multitask prompt tuning) as a CPU long tensor ``[B]``, or None.

    Raises:
        ValueError: not an integer tensor with one entry per row.
    """
    if task_ids is None:
        return None
    if not torch.is_tensor(task_ids) or task_ids.shape != (batch_size,) or task_ids.is_floating_point():
        raise ValueError(
            f"task_ids={task_ids!r}: expected an integer tensor [B] = [{batch_size}], one task per row. Fix: "
            "task_ids=torch.tensor([...]) with one entry per row."
        )
    return task_ids.long().cpu()


ADAPTER_NAME_RULE = "1 to 64 letters, digits, '_' or '-', not starting with '-'"
"""What an adapter name may be. A name becomes a module name and a folder under the directory it is saved to, so
nothing in it may leave that folder (no '/', '\\', '..'), start an option, or hide (spaces, newlines)."""

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def is_adapter_name(name: object) -> bool:
    """Whether `name` follows `ADAPTER_NAME_RULE`."""
    return isinstance(name, str) and _ADAPTER_NAME.fullmatch(name) is not None


def check_new_adapter_name(adapter_name: object, loaded: Iterable[str]) -> None:
    """Checks that `adapter_name` can name one more adapter beside the `loaded` ones.

    Raises:
        ValueError: not a name by `ADAPTER_NAME_RULE`, or already loaded.
    """
    if not is_adapter_name(adapter_name):
        raise ValueError(
            f"adapter_name={adapter_name!r}: expected {ADAPTER_NAME_RULE}, since it names a module and the folder it "
            "is saved to. Fix: e.g. 'complaints'."
        )
    loaded = sorted(loaded)
    if adapter_name in loaded:
        raise ValueError(
            f"adapter_name={adapter_name!r} is already loaded (loaded: {loaded}). Fix: pick another name."
        )


def _check_id_tensor(name: str, value: Any, device: torch.device) -> None:
    """A ``[B, T]`` integer tensor with B >= 1, on `device`."""
    if not torch.is_tensor(value):
        raise ValueError(
            f"{name} of type {type(value).__name__}: expected a torch.Tensor [B, T] of token ids. Fix: "
            "tokenizer(texts, return_tensors='pt', padding=True), or torch.tensor([[...]])."
        )
    if value.dim() != 2:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}: expected [B, T] (a batch of rows). Fix: add the batch "
            f"dimension, e.g. {name}.unsqueeze(0) for one row."
        )
    if value.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} has dtype {value.dtype}: expected integer token ids (torch.long). Fix: {name}.long().")
    if value.shape[0] == 0:
        raise ValueError(f"{name} has shape {tuple(value.shape)}: expected at least one row. Fix: pass a non-empty batch.")
    if value.device != device:
        raise ValueError(
            f"{name} is on {value.device} and the model on {device}: expected the model's device. Fix: "
            f"{name}.to({str(device)!r}) (and the attention mask too)."
        )


_GENERATE_INTEGERS = {
    "max_new_tokens": 1,
    "max_length": 1,
    "min_new_tokens": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "top_k": 0,
}
"""Integer options of transformers' ``generate`` and their smallest allowed value."""


_INPUTS_FORWARD_CANNOT_TAKE = frozenset(
    {"inputs_embeds", OLD_CACHE_NAME, NEW_CACHE_NAME, "position_ids", "cache_position", "output_attentions",
     "output_hidden_states"}
)
"""Keyword arguments of a transformers causal LM that `SoftPromptModel.forward` refuses rather than drop."""


def check_forward_options(options: Mapping[str, Any]) -> None:
    """Refuses model inputs `SoftPromptModel.forward` would drop (it builds embeddings, cache and positions itself);
    other extra keys (``num_items_in_batch``, which trainers pass) are accepted and ignored.

    Raises:
        ValueError: naming them and the fix.
    """
    if "input_type_mask" in options:
        raise ValueError(
            "SoftPromptModel.forward got input_type_mask (PEFT's CPT argument): softprompt scores the input's tokens "
            "by their labels, and a CPT adapter adds its context's own labels itself. Fix: drop input_type_mask and "
            "set labels to -100 wherever no loss is wanted."
        )
    refused = sorted(set(options) & _INPUTS_FORWARD_CANNOT_TAKE)
    if refused:
        raise ValueError(
            f"SoftPromptModel.forward got {', '.join(refused)}: it builds the embeddings, the cache and the "
            "positions itself from input_ids and attention_mask, so these would be ignored. Fix: pass input_ids "
            "(and attention_mask); for decoding use SoftPromptModel.generate."
        )


def check_generate_options(options: Mapping[str, Any]) -> None:
    """Checks the decoding options softprompt hands transformers' ``generate``.

    Only options that are given (not None) are checked; transformers' defaults are valid.

    Args:
        options: ``generate``'s keyword arguments.

    Raises:
        ValueError: ``inputs_embeds`` (the adapters make the soft prompt), or an option of the wrong type or outside
            its range (the message names the option, its flag and the fix).
    """
    if "inputs_embeds" in options:
        raise ValueError(
            "generate(inputs_embeds=...) is not supported: pass input_ids, the adapters add the soft prompt."
        )
    for name, minimum in _GENERATE_INTEGERS.items():
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(
                f"{name}={value!r}: expected an integer >= {minimum}. Fix: pass e.g. {name}={max(minimum, 1)} "
                f"(--{name.replace('_', '-')} on the command line)."
            )
    top_p = options.get("top_p")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(
            f"top_p={top_p!r}: expected a probability in (0, 1], the share of probability mass nucleus sampling keeps. "
            "Fix: pass e.g. top_p=0.95 (--top-p 0.95), or 1 to turn it off."
        )
    for name, example, note in (("temperature", "0.7", "for greedy decoding, leave do_sample off instead"),
                                ("repetition_penalty", "1.3", "1.0 means no penalty")):
        value = options.get(name)
        if value is not None and not (_is_number(value) and value > 0):
            raise ValueError(
                f"{name}={value!r}: expected a positive finite number. Fix: pass e.g. {name}={example} "
                f"(--{name.replace('_', '-')} {example}); {note}."
            )
    do_sample = options.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"do_sample={do_sample!r}: expected True or False. Fix: do_sample=True to sample.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_loss_implementation(implementation: str, device: torch.device | str) -> None:
    """Checks that a loss implementation can run on `device` in this process (only ``triton`` may not).

    Args:
        implementation: ``torch``, ``triton`` or ``full``.
        device: where the loss's tensors live.

    Raises:
        ValueError: ``triton`` without the triton package, or on CPU without the Triton interpreter.
    """
    if implementation != "triton":
        return
    from softprompt.kernels.fused_linear_cross_entropy import triton_unavailable_reason

    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise ValueError(
            f"loss_implementation='triton' cannot run here: {reason}. Fix: pass --loss-implementation torch "
            "(implementation='torch': the same label-only loss in plain PyTorch, on any device), or run on a CUDA "
            "GPU with triton installed."
        )
