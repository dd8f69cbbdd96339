"""softprompt: soft-prompt tuning of frozen causal language models, in plain PyTorch.

Where things live (the README's "How the code is organised" draws it):

- the methods, one file each, with the paper, the module and how it enters the model: ``softprompt/methods/``;
- what differs between model families, one file each: ``softprompt/families/``;
- the frozen model with its adapters: `softprompt.model`, which calls down to the row layout (`softprompt.rows`),
  the routes into the frozen model (`softprompt.routes`, `softprompt.frozen`), the training loss
  (`softprompt.training_loss`) and generation (`softprompt.generation`);
- saving and loading: PEFT's names and the one format check in `softprompt.pretrained`, our format in
  `softprompt.adapter_format`, PEFT's in `softprompt.peft_format`, the hub in `softprompt.hub`, the one-call loader
  in `softprompt.auto`;
- training runs: ``softprompt/training/``; the command line: `softprompt.cli`.

Shape notation used throughout: B batch, T tokens, P virtual tokens, L layers, H heads, K key/value heads, D head
dim, C embedding width (the hidden size in all but narrow-embedding OPT models), V vocab.
"""

from softprompt.auto import AutoSoftPromptModelForCausalLM
from softprompt.families import UnsupportedModelError, supported_model_types
from softprompt.files import AdapterFormatError, BaseModelMismatchError
from softprompt.methods import PUBLIC_CLASSES
from softprompt.model import SoftPromptModel, load_peft_adapter
from softprompt.seams import enable_activation_checkpointing
from softprompt.version import __version__

# Every method's config and enums (PromptTuningConfig, PromptTuningInit, ...), from the method registry.
globals().update(PUBLIC_CLASSES)

__all__ = [
    "AdapterFormatError",
    "AutoSoftPromptModelForCausalLM",
    "BaseModelMismatchError",
    "SoftPromptModel",
    "UnsupportedModelError",
    "__version__",
    "enable_activation_checkpointing",
    "load_peft_adapter",
    "supported_model_types",
    *PUBLIC_CLASSES,
]
