"""The model card (``README.md``) that `SoftPromptModel.push_to_hub` uploads beside the adapters, as PEFT writes one.

It opens with the hub's YAML metadata (written by huggingface_hub's ``ModelCardData``: the base model, the library,
tags, the pipeline) and then says what the repository holds (per adapter: the method, its virtual tokens and
parameters, where it sits) and how to load it, with softprompt and with PEFT.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCardData
from torch import nn

from softprompt.hub import is_repository_id
from softprompt.methods import method_of
from softprompt.version import __version__

DEFAULT_ADAPTER = "default"
"""The adapter name PEFT saves at the top of a directory (every other adapter goes into a subfolder of its name)."""


def base_model_name(model: nn.Module) -> str | None:
    """The name the frozen base was loaded under (``config._name_or_path``), or None when it was built in memory."""
    return getattr(model.base_model.config, "_name_or_path", None) or None


def _is_hub_model(name: str | None) -> bool:
    """Whether `name` names a hub model rather than a local directory (only hub ids belong in the metadata)."""
    return bool(name) and not Path(name).is_dir() and is_repository_id(name)


def _load_arguments(adapter_name: str) -> str:
    """The extra arguments that load `adapter_name` from its place in the repository."""
    if adapter_name == DEFAULT_ADAPTER:
        return ""
    return f', subfolder="{adapter_name}", adapter_name="{adapter_name}"'


def model_card(model: nn.Module, adapter_names: list[str], format: str, repo_id: str) -> str:
    """The ``README.md`` text for a repository holding `adapter_names` of `model` in `format`.

    Args:
        model: the `SoftPromptModel` the adapters belong to.
        adapter_names: the adapters the repository holds (``default`` at the top, others in subfolders).
        format: ``"softprompt"`` or ``"peft"``, the format they are saved in.
        repo_id: the repository's id, for the loading examples.

    Returns:
        The card: YAML metadata between ``---`` lines, then Markdown.
    """
    base = base_model_name(model)
    methods = sorted({method_of(model.adapter_configs[name]).cli_name for name in adapter_names})
    on_hub = _is_hub_model(base)
    metadata = ModelCardData(
        base_model=base if on_hub else None,
        library_name="peft" if format == "peft" else "softprompt",
        pipeline_tag="text-generation",
        tags=["softprompt", *methods] + ([f"base_model:adapter:{base}"] if on_hub else []),
    )
    if on_hub:
        base_text = f"[{base}](https://huggingface.co/{base})"
    elif base:
        base_text = f"`{base}` (a local model)"
    else:
        base_text = "a base model whose name was not recorded"
    rows = []
    for name in adapter_names:
        spec = method_of(model.adapter_configs[name])
        parameters = sum(parameter.numel() for parameter in model.prompts[name].parameters())
        place = "the top folder" if name == DEFAULT_ADAPTER else f"`{name}/`"
        rows.append(
            f"| `{name}` | {spec.cli_name} | {model.adapter_configs[name].num_virtual_tokens} | "
            f"{parameters:,d} | {place} |"
        )
    first = adapter_names[0]
    loading = [
        "With softprompt (reads softprompt's format and PEFT's):",
        "",
        "```python",
        "from softprompt import AutoSoftPromptModelForCausalLM",
        f'model = AutoSoftPromptModelForCausalLM.from_pretrained("{repo_id}"{_load_arguments(first)})'
        + ("  # loads the base model too" if base else ""),
        "# or onto a base model already loaded:",
        "from softprompt import SoftPromptModel",
        f'model = SoftPromptModel.from_pretrained(base_model, "{repo_id}"{_load_arguments(first)})',
        "```",
        "",
    ]
    if format == "peft":
        loading += [
            "With PEFT:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM, PeftModel",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}"{_load_arguments(first)})',
            f'model = PeftModel.from_pretrained(base_model, "{repo_id}"{_load_arguments(first)})',
            "```",
            "",
            "PEFT keeps the virtual tokens or prefix only (an encoder's output, not its weights).",
        ]
    else:
        loading += [
            "With PEFT: this repository is in softprompt's format, which keeps the encoders of p-tuning and "
            "projected prefix tuning so that training can resume. PEFT reads its own format; write that with "
            "softprompt first:",
            "",
            "```python",
            f'model = SoftPromptModel.from_pretrained(base_model, "{repo_id}"{_load_arguments(first)})',
            'model.save_peft_adapter("peft-adapter")',
            "from peft import PeftModel",
            'model = PeftModel.from_pretrained(base_model, "peft-adapter")',
            "```",
        ]
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"Soft-prompt adapters ({', '.join(methods)}) for {base_text}, saved by softprompt {__version__} in "
        f"{'PEFT' if format == 'peft' else 'softprompt'}'s format. The base model stays frozen: these adapters are "
        "all that was trained.",
        "",
        "| adapter | method | virtual tokens | parameters | where |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "## How to load it",
        "",
        *loading,
        "",
    ]
    return "\n".join(lines)
