"""The teacher of context distillation: the frozen model with the whole document in context, and its k most likely
next tokens at every position of every conversation, computed once (`teacher_targets`) and stored
(`TopKTargets.save`).

"The document in context" is the document's own key/value cache in front of each conversation: the frozen model's
prefill of the document's tokens, held as a cartridge of every position, all frozen (`document_cache`). It is the
document in context exactly (a cache from a prefill is what the model would compute with the text in front), runs
one prefill instead of one per conversation, and makes the student's target plain: a cartridge that stood for the
whole document would be this one.

Shapes: R conversations, N positions (all conversations' tokens), k kept tokens, T tokens, C hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from softprompt.data import collate
from softprompt.files import atomic_write_bytes
from softprompt.methods.cartridge import CartridgeCache, CartridgeConfig, prefill_key_values, table_from_key_values
from softprompt.model import SoftPromptModel
from softprompt.routes import prefix_route_hidden_states

DOCUMENT_ADAPTER = "document"
"""The adapter name of the document's own cache (the teacher's context)."""


def document_cache(base_model: Any, context_ids: Sequence[int]) -> tuple[CartridgeConfig, CartridgeCache]:
    """The document's key/value cache as a cartridge of all its positions, every one frozen.

    Args:
        base_model: the frozen base.
        context_ids: the document's ids as a context (`softprompt.cartridges.chat.ChatFormat.context_ids`).

    Returns:
        Its config and module (on the base's device).
    """
    keys, values = prefill_key_values(base_model, context_ids)  # each [L, K, S, D]
    config = CartridgeConfig(num_virtual_tokens=len(context_ids), num_frozen_tokens=len(context_ids))
    table = table_from_key_values(keys, values, len(context_ids))
    return config, CartridgeCache(config, table.shape[1], table).to(table.device)


@dataclass
class TopKTargets:
    """The teacher's top-k next-token distributions at every position of R conversations."""

    ids: torch.Tensor
    """``[N, k]`` int64: the k most likely next tokens at each position, most likely first."""
    logprobs: torch.Tensor
    """``[N, k]`` fp32: their log-probabilities under the teacher's whole-vocabulary softmax."""
    offsets: torch.Tensor
    """``[R + 1]`` int64: conversation r's positions are rows ``offsets[r]:offsets[r + 1]`` (one per token)."""

    def of(self, conversations: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the given conversations, concatenated in order: ids and log-probabilities ``[n, k]``."""
        rows = torch.cat([torch.arange(int(self.offsets[r]), int(self.offsets[r + 1])) for r in conversations])
        return self.ids[rows], self.logprobs[rows]

    def save(self, path: Path) -> None:
        """Writes the three tensors to a safetensors file (atomically)."""
        payload = safetensors_save({"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous(),
                                    "offsets": self.offsets.contiguous()}, metadata={"format": "softprompt-teacher"})
        atomic_write_bytes(path, payload)

    @classmethod
    def load(cls, path: Path) -> "TopKTargets":
        """Reads what `save` wrote (safetensors: nothing is unpickled)."""
        tensors = safetensors_load(path.read_bytes())
        return cls(tensors["ids"], tensors["logprobs"], tensors["offsets"])


@torch.no_grad()
def teacher_targets(
    model: SoftPromptModel, conversations: Sequence[Sequence[int]], top_k: int, batch_size: int,
    adapter_name: str = DOCUMENT_ADAPTER, positions_per_chunk: int = 256,
) -> TopKTargets:
    """The teacher's top-k next-token distributions at every position of every conversation.

    Args:
        model: a model holding the document's cache as `adapter_name` (`document_cache`).
        conversations: R lists of ids, each following the document.
        top_k: k.
        batch_size: conversations per pass.
        adapter_name: the document's adapter.
        positions_per_chunk: positions whose full ``[n, V]`` logits are held at once.

    Returns:
        The `TopKTargets` (on the CPU).
    """
    frozen = model.frozen
    head, softcap = frozen.head_weight, frozen.logit_softcap
    ids_parts, logprob_parts = [], []
    for start in range(0, len(conversations), batch_size):
        rows = [{"input_ids": list(ids)} for ids in conversations[start : start + batch_size]]
        batch = collate(rows, pad_token_id=0, padding_side="left")
        input_ids, mask = batch["input_ids"].to(frozen.device), batch["attention_mask"].to(frozen.device)
        layout, entries = model.layout_and_entries(len(rows), [adapter_name] * len(rows), None)
        hidden, _ = prefix_route_hidden_states(frozen, layout, entries, input_ids, mask)  # [B, T, C]
        real = hidden[mask.bool()]  # [n, C]: row by row, each row's positions in order (left padding)
        for chunk in real.split(positions_per_chunk):
            logits = chunk.float() @ head.float().T  # [n', V]
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
            ids_parts.append(top.indices.cpu())
            logprob_parts.append(top.values.cpu())
    lengths = torch.tensor([0] + [len(ids) for ids in conversations])
    return TopKTargets(torch.cat(ids_parts), torch.cat(logprob_parts), lengths.cumsum(0))
