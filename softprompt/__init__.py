"""softprompt: soft-prompt tuning of frozen causal language models, in plain PyTorch."""

__version__ = "0.1.0"
