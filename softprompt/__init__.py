"""softprompt: soft-prompt tuning of frozen causal language models, in plain PyTorch.

Where each method lives:
- prompt tuning: `softprompt.prompt_tuning` (Lester et al., 2021)
- p-tuning: `softprompt.p_tuning` (Liu et al., 2021)
- prefix tuning: `softprompt.prefix_tuning` (Li and Liang, 2021)
- how they are injected into the frozen model: `softprompt.model`
- saving and loading: `softprompt.adapter_format` (ours), `softprompt.peft_format` (PEFT's)

Shape notation used throughout: B batch, T tokens, P virtual tokens, L layers, H heads, D head dim, C hidden,
V vocab.
"""

__version__ = "0.1.0"

from softprompt.adapter_format import AdapterFormatError
from softprompt.model import SoftPromptModel
from softprompt.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from softprompt.peft_format import load_peft_adapter
from softprompt.prefix_tuning import PrefixTuningConfig
from softprompt.prompt_tuning import PromptTuningConfig, PromptTuningInit
from softprompt.seams import enable_activation_checkpointing

__all__ = [
    "AdapterFormatError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SoftPromptModel",
    "load_peft_adapter",
    "enable_activation_checkpointing",
    "__version__",
]
