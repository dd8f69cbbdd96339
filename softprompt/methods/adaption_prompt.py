"""Adaption prompt (LLaMA-Adapter): gated tokens of its own that the top layers' attention attends to.

Zhang, Han, Liu, Gao, Lu, Zhou, Yan, Li, Gao and Qiao, "LLaMA-Adapter: Efficient Fine-tuning of Language Models
with Zero-init Attention" (arXiv 2303.16199, 2023).

The method in one sentence: keep the language model frozen, and give each of its top N_a layers A learned tokens
that every query of the layer also attends to, in a softmax of their own whose result is multiplied by a learned
gate that starts at zero. Unlike prompt tuning, nothing is put in front of the input and no position is taken: the
adapter enters inside attention, only in the top layers, and at initialization (gate 0) the model is exactly the
base model ("zero-init attention"), so training starts from what the model already does instead of from noise.

How it enters the model (PEFT's ``AdaptedAttention``, `reference_forward`, written out), in each adapted layer:

1. the layer's attention runs unchanged: ``out = attention(hidden_states)``;
2. the adapter's ``[A, C]`` tokens go through the layer's own frozen key and value projections: keys and values
   ``[K, A, D]`` at no position (no rotary, no ALiBi bias; grouped-query heads shared as the layer shares them);
3. the layer's queries for the hidden states (its query projection, rotated at their real positions) score them:
   ``scores = q @ keys^T * scale`` ``[B, H, T, A]``, with no mask: every query sees all A tokens;
4. ``out += output_projection(gate * softmax(scores) @ values)``, a softmax over the A tokens alone, apart from the
   attention over the text.

Nothing is cached: the adapter's keys and values are recomputed from the tokens in every call, and in generation
only the new queries get the term, so ``generate`` needs nothing special (PEFT's generate is correct here).

What differs between families (which submodule is the attention, fused projections, query/key norms, the score
scale and soft-capping, whether attended values pass through ``o_proj``) is the family's `AttentionAccess`;
`softprompt.attention` computes the term from it. PEFT runs the method on Llama, Mistral and GPT-2 only, and
composes it differently there: on GPT-2 the attended values join the output after ``c_proj`` without passing
through it; on Llama/Mistral ``o_proj`` is applied to them whole, so a biased ``o_proj`` (``attention_bias=True``)
adds its bias a second time and a zero gate no longer gives the base model. softprompt follows PEFT on those
families (the same numbers, weights moving both ways); on the others it uses the output projection's weight alone, so
that a zero gate is the base model exactly.

On the real path, `enter` hands the engine a `softprompt.entries.AttentionPatch`: forward hooks on the adapted
attention modules for one call, adding the term to the adapter's rows only, so that rows of other adapters (of
any method) share the batch.

Parameters, all trainable (PEFT's count ``N_a * (A * C + 1)``): ``adaption_prompt [N_a, A, C]``, N(0, 1) as PEFT
(the paper's official code uses an ``nn.Embedding``), and ``adaption_gate [N_a]``, zeros. Both stay fp32 here
(PEFT creates them in the base's dtype) and are cast to the base's dtype where they are used.

Shapes: B batch, R the adapter's rows, T tokens, A adapter tokens (``adapter_len``), N_a adapted layers
(``adapter_layers``), L layers, H query heads, K key/value heads, D head dim, C hidden size, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.attention import (
    AdaptedLayer,
    AttentionHook,
    HooksForOneCall,
    adapted_layers,
    attended,
    hidden_states_of,
    keys_and_values,
    queries,
)
from softprompt.entries import AttentionPatch, EntryRequest
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape, Family
from softprompt.methods.spec import MethodSpec, Paper, check_positive_int, device_memory
from softprompt.positions import position_inputs

PEFT_PREFIX = "base_model.model."
"""Where PEFT's state dict puts the base model's modules (``PeftModel.base_model.model``)."""
PEFT_PROMPT = "adaption_prompt"
PEFT_GATE = "adaption_gate"


@dataclass
class AdaptionPromptConfig:
    """Configuration of adaption prompt (LLaMA-Adapter); a PEFT user switches by changing the import."""

    target_modules: str | None = None
    """The attention submodule of each decoder layer that gets the adapter (PEFT's name for it); None: the
    family's (``self_attn``; GPT-2 ``attn``, BLOOM ``self_attention``, GPT-NeoX ``attention``). Any other name is
    refused: the method needs the attention submodule."""

    adapter_len: int = None  # type: ignore[assignment]
    """A, the adapter tokens each adapted layer attends to (the paper: 10). Required."""

    adapter_layers: int = None  # type: ignore[assignment]
    """N_a, how many of the top layers are adapted (the paper: 30 of LLaMA-7B's 32). Required; at most L."""

    method: ClassVar[str] = "adaption_prompt"

    def __post_init__(self) -> None:
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ValueError(
                f"target_modules={self.target_modules!r}: expected the name of each layer's attention submodule, "
                "or None for the model's own. Fix: leave it out (e.g. AdaptionPromptConfig(adapter_len=10, "
                "adapter_layers=2)), or pass target_modules='self_attn'."
            )
        check_positive_int("adapter_len", self.adapter_len, "AdaptionPromptConfig(adapter_len=10, adapter_layers=2) "
                           "(--adapter-len 10)")
        check_positive_int("adapter_layers", self.adapter_layers, "AdaptionPromptConfig(adapter_len=10, "
                           "adapter_layers=2) (--adapter-layers 2; at most the model's layers)")


class AdaptionPrompt(nn.Module):
    """Each adapted layer's tokens and gate.

    Args:
        config: the adaption-prompt configuration.
        shape: the base's dimensions (C, and L, which `adapter_layers` must not exceed).

    Raises:
        ValueError: `adapter_layers` exceeds the base's layers.
    """

    def __init__(self, config: AdaptionPromptConfig, shape: BaseModelShape):
        super().__init__()
        if config.adapter_layers > shape.num_layers:
            raise ValueError(
                f"adapter_layers={config.adapter_layers}: the base model has {shape.num_layers} layers. Fix: pass "
                f"adapter_layers={shape.num_layers} or fewer (the top layers are adapted)."
            )
        self.config = config
        # C is the width attention reads: the hidden size (OPT's narrow embeddings are projected to it first).
        self.adaption_prompt = nn.Parameter(torch.empty(config.adapter_layers, config.adapter_len, shape.hidden_size))
        # [N_a]: one scalar per layer, shared by its heads, applied as it is (no tanh), as in PEFT.
        self.adaption_gate = nn.Parameter(torch.zeros(config.adapter_layers))
        nn.init.normal_(self.adaption_prompt)  # PEFT's init (``torch.empty(...).normal_()``)


def check_tokens_fit_in_memory(config: AdaptionPromptConfig, shape: BaseModelShape, device: torch.device) -> None:
    """Refuses an adapter whose ``[N_a, A, C]`` fp32 tokens alone exceed the device's memory, before allocating.

    Raises:
        ValueError: naming A, the bytes needed, the memory there is, and the fix.
    """
    needed = config.adapter_layers * config.adapter_len * shape.hidden_size * 4
    available = device_memory(device)
    if available is not None and needed > available:
        raise ValueError(
            f"adapter_len={config.adapter_len}: the [{config.adapter_layers}, {config.adapter_len}, "
            f"{shape.hidden_size}] fp32 adapter tokens need {needed / 2**30:,.1f} GiB, more than the "
            f"{available / 2**30:,.1f} GiB of memory on {device}. Expected a few adapter tokens per layer (the paper "
            "uses 10). Fix: pass e.g. adapter_len=10 (--adapter-len 10)."
        )


def layers_of(config: AdaptionPromptConfig, base_model: PreTrainedModel, family: Family | None = None
              ) -> list[AdaptedLayer]:
    """The adapted layers' attention submodules: the top ``adapter_layers`` (`softprompt.attention`).

    Raises:
        ValueError: the family's attention is unreachable, or the config does not fit the model.
    """
    family = family if family is not None else family_of(base_model.config)
    return adapted_layers(base_model, family, config.adapter_layers, "adaption prompt", config.target_modules)


def empty(config: AdaptionPromptConfig, shape: BaseModelShape) -> AdaptionPrompt:
    """The module's structure, about to receive stored weights."""
    return AdaptionPrompt(config, shape)


def build(config: AdaptionPromptConfig, base_model: PreTrainedModel, tokenizer: Any | None = None) -> AdaptionPrompt:
    """The tokens (N(0, 1)) and zero gates, on the base's device, after checking that the base's attention can be
    reached (`layers_of`)."""
    shape = family_of(base_model.config).shape(base_model.config)
    layers_of(config, base_model)
    device = base_model.get_input_embeddings().weight.device
    check_tokens_fit_in_memory(config, shape, device)
    with torch.device(device):
        return empty(config, shape)


def layer_hook(module: AdaptionPrompt, offset: int, family: Family, shape: BaseModelShape,
               rows: torch.Tensor | None) -> AttentionHook:
    """The forward hook adding the adapter's term of one layer (the `offset`-th adapted) to `rows` of the batch.

    Args:
        rows: ``[R]`` distinct batch rows in increasing order, or None for every row.
    """
    access = family.attention

    def hook(attention: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple:
        hidden_states = hidden_states_of(args, kwargs)  # [B, T, C]
        out = output[0]  # [B, T, C]
        every_row = rows is None or len(rows) == out.shape[0]  # distinct and in order: all of them
        index = None if every_row else rows.to(out.device)
        query = queries(access, attention, hidden_states if every_row else hidden_states[index], kwargs, shape,
                        index)  # [R, H, T, D]
        tokens = module.adaption_prompt[offset].to(device=hidden_states.device, dtype=hidden_states.dtype)  # [A, C]
        keys, values = keys_and_values(access, attention, tokens, shape)  # each [K, A, D]
        term = attended(access, attention, query, keys, values, module.adaption_gate[offset], shape)  # [R, T, C]
        out = out + term.to(out.dtype) if every_row else out.index_add(0, index, term.to(out.dtype))
        return (out, *output[1:])

    return hook


def enter(module: AdaptionPrompt, request: EntryRequest) -> AttentionPatch:
    """Hooks on the adapted layers' attention that add the term to the adapter's rows, for one call."""
    layers = layers_of(module.config, request.base_model, request.family)

    @contextmanager
    def install(rows: torch.Tensor) -> Iterator[None]:
        hooks = HooksForOneCall([
            (adapted, layer_hook(module, offset, request.family, request.shape, rows))
            for offset, adapted in enumerate(layers)
        ])
        with hooks.installed():
            yield

    return AttentionPatch(install)


def reference_forward(
    base_model: PreTrainedModel,
    module: AdaptionPrompt,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """The base model with every row's adapted attention outputs increased by the gated term, as PEFT's
    ``AdaptedAttention`` does; the plain reference the engine is tested against.

    Per adapted layer: ``out = attention(...) + output_projection(gate * softmax(q @ K_a^T * scale) @ V_a)``, with
    ``K_a, V_a`` the adapter tokens through the layer's frozen key and value projections (`softprompt.attention`).

    Args:
        base_model: the frozen transformers causal LM.
        module: the adapter's tokens and gates.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]`` (-100 where no loss is wanted) or None.

    Returns:
        The base model's output: ``.logits [B, T, V]`` and ``.loss``.
    """
    family = family_of(base_model.config)
    shape = family.shape(base_model.config)
    handles = [adapted.attention.register_forward_hook(layer_hook(module, offset, family, shape, None),
                                                       with_kwargs=True)
               for offset, adapted in enumerate(layers_of(module.config, base_model, family))]
    try:
        return base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          **position_inputs(family, attention_mask, input_ids.shape[1]))
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ PEFT's format: one tensor pair per adapted layer


def peft_tensors(config: AdaptionPromptConfig, base_model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """PEFT's ``adapter_model.safetensors``: for each adapted layer, ``<path>.adaption_prompt [1, A, C]`` and
    ``<path>.adaption_gate [1]``, the path being the attention submodule's under ``base_model.model.``."""
    hidden_size = family_of(base_model.config).shape(base_model.config).hidden_size
    tensors: dict[str, tuple[int, ...]] = {}
    for adapted in layers_of(config, base_model):
        tensors[f"{PEFT_PREFIX}{adapted.name}.{PEFT_PROMPT}"] = (1, config.adapter_len, hidden_size)
        tensors[f"{PEFT_PREFIX}{adapted.name}.{PEFT_GATE}"] = (1,)
    return tensors


def peft_state(module: AdaptionPrompt, base_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves, by `peft_tensors`' names, from the module's stacked ones."""
    state = {}
    for offset, adapted in enumerate(layers_of(module.config, base_model)):
        state[f"{PEFT_PREFIX}{adapted.name}.{PEFT_PROMPT}"] = module.adaption_prompt[offset : offset + 1]
        state[f"{PEFT_PREFIX}{adapted.name}.{PEFT_GATE}"] = module.adaption_gate[offset : offset + 1]
    return state


def peft_module(config: AdaptionPromptConfig, base_model: PreTrainedModel,
                tensors: dict[str, torch.Tensor]) -> AdaptionPrompt:
    """A module holding what PEFT saved (names and shapes already checked against `peft_tensors`)."""
    module = empty(config, family_of(base_model.config).shape(base_model.config))
    with torch.no_grad():
        for offset, adapted in enumerate(layers_of(config, base_model)):
            module.adaption_prompt[offset] = tensors[f"{PEFT_PREFIX}{adapted.name}.{PEFT_PROMPT}"][0]
            module.adaption_gate[offset] = tensors[f"{PEFT_PREFIX}{adapted.name}.{PEFT_GATE}"][0]
    return module


METHOD = MethodSpec(
    name="adaption_prompt",
    cli_name="adaption-prompt",
    config_class=AdaptionPromptConfig,
    enters_as="attention",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="ADAPTION_PROMPT",
    peft_fields=("target_modules", "adapter_len", "adapter_layers"),
    default_num_virtual_tokens=None,  # no virtual tokens: the adapter takes no slot
    # PEFT requires both. 10 tokens as in the paper; the top 2 layers exist in every model (the paper adapts the top
    # 30 of LLaMA-7B's 32: pass --adapter-layers for more).
    train_defaults={"adapter_len": 10, "adapter_layers": 2},
    peft_module=peft_module,
    paper=Paper("Zhang et al.", 2023, "2303.16199",
                "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention"),
    trains="`[A, C]` tokens and a scalar gate in each of the top N_a layers (A = `adapter_len`, N_a = "
           "`adapter_layers`)",
    peft_tensors=peft_tensors,
    peft_state=peft_state,
    materialized=None,  # tokens and gates per layer, not one output table
    reference_forward=reference_forward,
)
