"""PEFT as the reference: its configuration for a softprompt one, and a PEFT model holding a softprompt adapter.

Shared by the tests and the benchmarks, which compare softprompt with PEFT on the same frozen weights; the library
itself never imports peft. The tests reach this folder through pytest's ``pythonpath``, the benchmark scripts
because they run from it.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import torch
from peft import get_peft_model_state_dict, PeftModel, TaskType, get_peft_model
from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

from softprompt.families import family_of
from softprompt.methods import method_of


def peft_config_for(config: Any, base_model: torch.nn.Module | None = None, **peft_fields: Any) -> peft.PeftConfig:
    """A fresh PEFT configuration equal to a softprompt one (same class name and fields, CAUSAL_LM).

    Fresh on every call: ``get_peft_model`` fills a config's unset fields (``num_layers``, ``token_dim``,
    ``base_model_name_or_path``, ...) in place from the first model it wraps, so a reused config would carry one
    model's shape to the next.

    Args:
        config: a softprompt config.
        base_model: the base it will wrap, when known: virtual tokens narrower than the hidden size (OPT's
            ``project_in`` models) need PEFT's ``token_dim`` set to the embedding width, since its default, the
            hidden size, fails there.
        **peft_fields: PEFT-only fields, e.g. ``tokenizer_name_or_path``, which PEFT's TEXT init needs.

    Raises:
        ValueError: not a softprompt config.
    """
    spec = method_of(config)
    fields = {name: getattr(getattr(config, name), "value", getattr(config, name)) for name in spec.peft_fields}
    if base_model is not None and spec.enters_as == "virtual_tokens":
        shape = family_of(base_model.config).shape(base_model.config)
        if shape.embedding_width != shape.hidden_size:
            fields["token_dim"] = shape.embedding_width
    return getattr(peft, type(config).__name__)(task_type=TaskType.CAUSAL_LM, **{**fields, **peft_fields})


def peft_refusal(config: Any, model_type: str) -> str | None:
    """Why PEFT refuses to build `config` on a model of `model_type`, or None where it builds it: PEFT runs adaption
    prompt on the model types of its own table only (llama, mistral, gpt2 in 0.21.2); softprompt on every family."""
    if method_of(config).name == "adaption_prompt" and model_type not in TRANSFORMERS_MODEL_CONFIG:
        return f"PEFT runs adaption prompt on {', '.join(TRANSFORMERS_MODEL_CONFIG)} only"
    return None


def copy_adapter_weights(ours: Any, theirs: PeftModel, adapter_name: str = "default",
                         peft_adapter_name: str = "default") -> None:
    """Gives PEFT's adapter softprompt's weights (PEFT's state-dict names are ours under
    ``prompt_encoder.<name>.``).

    Raises:
        RuntimeError: a softprompt tensor PEFT does not have, or a PEFT adapter tensor left without a value.
    """
    prefix = f"prompt_encoder.{peft_adapter_name}."
    state = {prefix + key: value for key, value in ours.prompts[adapter_name].state_dict().items()}
    result = theirs.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if key.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"PEFT's adapter did not take softprompt's weights: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")


def copy_weights_from_peft(theirs: PeftModel, ours: Any, adapter_name: str = "default",
                           peft_adapter_name: str = "default") -> None:
    """Gives softprompt's adapter PEFT's weights (after PEFT trained them): `copy_adapter_weights` the other way.

    Raises:
        RuntimeError: a tensor of ours PEFT does not have.
    """
    spec = method_of(ours.adapter_configs[adapter_name])
    if spec.enters_as == "attention":  # adaption prompt: PEFT's tensors in the attention modules, by saved name
        tensors = get_peft_model_state_dict(theirs, adapter_name=peft_adapter_name)
        module = spec.peft_module(ours.adapter_configs[adapter_name], ours.base_model, tensors)
        ours.prompts[adapter_name].load_state_dict(module.state_dict(), strict=True)
        return
    prefix = f"prompt_encoder.{peft_adapter_name}."
    state = {key[len(prefix):]: value for key, value in theirs.state_dict().items() if key.startswith(prefix)}
    ours.prompts[adapter_name].load_state_dict(state, strict=True)


def peft_twin(ours: Any, base_model: torch.nn.Module, adapter_name: str = "default",
              peft_config: peft.PeftConfig | None = None, share_base: bool = False) -> PeftModel:
    """A PEFT model holding softprompt adapter `adapter_name`'s weights, in eval mode (any method: a prompt-learning
    adapter's under ``prompt_encoder.<name>.``, an adaption prompt's in the base's attention modules).

    Args:
        ours: the `SoftPromptModel`.
        base_model: its frozen base.
        adapter_name: the adapter to copy.
        peft_config: PEFT's config; None: `peft_config_for` the adapter's.
        share_base: wrap `base_model` itself (PEFT then holds it: benchmarks, one copy of the weights) instead of
            a deep copy (tests, which keep using the base).
    """
    our_config = ours.adapter_configs[adapter_name]
    config = peft_config if peft_config is not None else peft_config_for(our_config, base_model)
    spec = method_of(our_config)
    # Adaption prompt is not a prompt-learning method: PEFT's adapter lives in the base's attention modules, in the
    # base's dtype, under the base's module paths, the names the spec's PEFT export writes (read before PEFT wraps
    # those modules, which share_base would do to `base_model` itself).
    state = spec.peft_state(ours.prompts[adapter_name], base_model) if spec.enters_as == "attention" else None
    twin = get_peft_model(base_model if share_base else copy.deepcopy(base_model), config)
    if state is not None:
        result = twin.load_state_dict(state, strict=False)
        trainable = {name for name, parameter in twin.named_parameters() if parameter.requires_grad}
        if result.unexpected_keys or trainable != set(state):
            raise RuntimeError(f"PEFT's adapter did not take softprompt's weights: PEFT trains {sorted(trainable)}, "
                               f"softprompt gave {sorted(state)}")
        return twin.eval()
    # PEFT builds its prompt encoder in float32 whatever the base's dtype; ours may be float64 (exactness tests).
    dtype = next(ours.prompts[adapter_name].parameters()).dtype
    twin.prompt_encoder.to(dtype)
    copy_adapter_weights(ours, twin, adapter_name)
    return twin.eval()
