"""Cartridges beyond the method itself (``softprompt/methods/cartridge.py``): training them by context distillation
on self-study conversations, as Eyuboglu et al. (arXiv 2506.06266) do, measuring what one buys, and PEFT's helpers.

- `softprompt.cartridges.chat`: the token layout of a document and a conversation about it;
- `softprompt.cartridges.self_study`: conversations written by the frozen model with the document in context;
- `softprompt.cartridges.teacher`: the document's own cache and the teacher's top-k targets, computed once;
- `softprompt.cartridges.distillation`: the top-k KL loss, from k rows of the LM head;
- `softprompt.training.context_distillation`: all of it as the ``context-distillation`` recipe of ``softprompt train``;
- `softprompt.cartridges.evaluation`: answers' likelihood with the cartridge, the document or nothing; memory; speed;
- `softprompt.cartridges.adapters`: PEFT's helpers (initialize from a text or a cache, compose saved cartridges).
"""

from softprompt.cartridges.adapters import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    load_kv_table,
)
from softprompt.cartridges.chat import ChatFormat
from softprompt.cartridges.distillation import TopKDistillationLoss, rows_of_head, topk_kl
from softprompt.cartridges.self_study import SEED_PROMPTS, Conversation, self_study
from softprompt.cartridges.teacher import TopKTargets, document_cache, teacher_targets

__all__ = [
    "SEED_PROMPTS",
    "ChatFormat",
    "Conversation",
    "TopKDistillationLoss",
    "TopKTargets",
    "compose_cartridge_adapters",
    "document_cache",
    "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text",
    "load_kv_table",
    "rows_of_head",
    "self_study",
    "teacher_targets",
    "topk_kl",
]
