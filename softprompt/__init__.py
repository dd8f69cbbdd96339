"""softprompt: soft-prompt tuning of frozen causal language models, in plain PyTorch.

Where things live (the README's "How the code is organised" draws it):

- the methods, one file each, with the paper, the module and how it enters the model: ``softprompt/methods/``
  (prompt tuning, Lester et al. 2021; p-tuning, Liu et al. 2021; prefix tuning, Li and Liang 2021);
- what differs between model families, one file each: ``softprompt/families/``;
- the frozen model with its adapters: `softprompt.model` (routes in `softprompt.injection`, the training loss in
  `softprompt.training_loss`, generation in `softprompt.generation`);
- saving and loading: `softprompt.adapter_format` (ours), `softprompt.peft_format` (PEFT's), PEFT's names for both
  and the hub in `softprompt.pretrained` / `softprompt.hub`, the one-call loader in `softprompt.auto`;
- training runs: ``softprompt/training/``; the command line: `softprompt.cli`.

Shape notation used throughout: B batch, T tokens, P virtual tokens, L layers, H heads, K key/value heads, D head
dim, C embedding width (the hidden size in all but narrow-embedding OPT models), V vocab.
"""

from softprompt.families import UnsupportedModelError, supported_model_types
from softprompt.auto import AutoSoftPromptModelForCausalLM
from softprompt.files import AdapterFormatError, BaseModelMismatchError
from softprompt.methods import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from softprompt.model import SoftPromptModel, load_peft_adapter
from softprompt.seams import enable_activation_checkpointing
from softprompt.version import __version__

__all__ = [
    "AdapterFormatError",
    "AutoSoftPromptModelForCausalLM",
    "BaseModelMismatchError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SoftPromptModel",
    "UnsupportedModelError",
    "__version__",
    "enable_activation_checkpointing",
    "load_peft_adapter",
    "supported_model_types",
]
