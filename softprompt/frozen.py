"""The frozen base model, and the passes through it that the engine asks for.

`FrozenModel` holds the transformers causal LM (never modified, all its parameters frozen), its family record and
its shape, and runs it at its public seams only: ``inputs_embeds``, the key/value cache, the attention mask and the
positions. Two passes serve every route:

- `FrozenModel.decoder_pass`: the decoder over ``[B, S, C]`` embeddings after an optional cache, returning the
  final hidden states (the training loss applies the LM head itself, at labelled positions only), or `logits`,
  the whole model (the reference layout of `SoftPromptModel.forward`);
- `FrozenModel.virtual_token_pass`: the decoder over G prompts of P virtual tokens as a batch of G, keeping their
  keys and values, so that the virtual tokens can enter every row as a key/value prefix (they come first and
  attention is causal, so their keys and values do not depend on the text that follows).

Shapes: B batch, S slots after the cache, G prompts, P virtual tokens, L layers, K key/value heads, D head dim,
C embedding width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from softprompt.families import family_of
from softprompt.positions import position_inputs
from softprompt.prefix_cache import PrefixCache, checkpointed_layers_read_cache
from softprompt.seams import cache_argument


@dataclass
class DecoderInputs:
    """One decoder call's inputs, as the routes build them."""

    embeddings: torch.Tensor
    """``[B, S, C]`` input embeddings (virtual tokens and token embeddings)."""
    attention_mask: torch.Tensor
    """``[B, P + S]`` over the cache's P slots and the S slots here."""
    cache: PrefixCache | None
    """The read-only key/value prefix, or None."""
    positions: dict[str, torch.Tensor]
    """The family's position arguments (`softprompt.positions.position_inputs`)."""

    def as_kwargs(self, module: torch.nn.Module) -> dict[str, Any]:
        """The keyword arguments of `module`'s forward (the cache under the name it takes, `softprompt.seams`)."""
        cache = cache_argument(module, self.cache) if self.cache is not None else {}
        return {"inputs_embeds": self.embeddings, "attention_mask": self.attention_mask, "use_cache": False,
                **cache, **self.positions}


class FrozenModel:
    """A frozen transformers causal LM of a supported family, and the passes the engine runs through it.

    Args:
        base_model: the model; its parameters are frozen here, nothing else about it changes.

    Raises:
        UnsupportedModelError: its family is not supported.
    """

    def __init__(self, base_model: PreTrainedModel):
        self.base_model = base_model
        self.family = family_of(base_model.config)
        self.shape = self.family.shape(base_model.config)
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        decoder = base_model.get_decoder()
        embedding_parameters = sum(module.weight.numel() for module in decoder.modules()
                                   if isinstance(module, torch.nn.Embedding))
        self.layer_parameters = (sum(p.numel() for p in decoder.parameters()) - embedding_parameters) // \
            self.shape.num_layers
        """The parameters of one decoder layer (the decoder's, embeddings aside, over L)."""
        self._compiled_decoder_pass: Callable[[DecoderInputs], torch.Tensor] | None = None
        self._compiled_virtual_token_pass: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    @property
    def device(self) -> torch.device:
        """Where the input embeddings live (the device inputs must be on)."""
        return self.base_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The input embeddings' dtype, which every adapter output is cast to."""
        return self.base_model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ids -> ``[B, T, C]`` the model's own input embeddings (Gemma's scale included)."""
        return self.base_model.get_input_embeddings()(input_ids)

    @property
    def head_weight(self) -> torch.Tensor:
        """``[V, C]`` the LM head."""
        return self.base_model.get_output_embeddings().weight

    @property
    def logit_softcap(self) -> float | None:
        """The final logits' soft-capping value (Gemma 2), or None."""
        return self.family.logit_softcap(self.base_model.config)

    def decoder_pass(self, inputs: DecoderInputs) -> torch.Tensor:
        """The frozen decoder: final hidden states ``[B, S, C]`` (after the final norm)."""
        with checkpointed_layers_read_cache(self.base_model):
            return (self._compiled_decoder_pass or self._eager_decoder_pass)(inputs)

    def _eager_decoder_pass(self, inputs: DecoderInputs) -> torch.Tensor:
        decoder = self.base_model.get_decoder()
        return decoder(**inputs.as_kwargs(decoder)).last_hidden_state

    def logits(self, inputs: DecoderInputs) -> torch.Tensor:
        """The whole frozen model: logits ``[B, S, V]``."""
        with checkpointed_layers_read_cache(self.base_model):
            return self.base_model(**inputs.as_kwargs(self.base_model)).logits

    def virtual_token_pass(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder over G prompts of P virtual tokens at positions 0..P-1, as a batch of G.

        Returns:
            Their keys and values, each ``[L, G, K, P, D]``, and their final hidden states ``[G, P, C]`` (the last
            one predicts the first real token).
        """
        # The cache must be filled, and the pass is only P tokens long: nothing to gain from checkpointing it, and a
        # checkpointed layer would not fill the cache.
        paused = [module for module in self.base_model.modules() if getattr(module, "gradient_checkpointing", False)]
        for module in paused:
            module.gradient_checkpointing = False
        try:
            return (self._compiled_virtual_token_pass or self._eager_virtual_token_pass)(embeddings)
        finally:
            for module in paused:
                module.gradient_checkpointing = True

    def _eager_virtual_token_pass(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=self.base_model.config)
        decoder = self.base_model.get_decoder()
        mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)  # [G, P]
        output = decoder(inputs_embeds=embeddings, attention_mask=mask, use_cache=True,
                         **cache_argument(decoder, cache), **position_inputs(self.family, mask, embeddings.shape[1]))
        keys = torch.stack([layer.keys for layer in cache.layers])  # [L, G, K, P, D]
        values = torch.stack([layer.values for layer in cache.layers])
        return keys, values, output.last_hidden_state

    def compile(self, **compile_options: Any) -> None:
        """Runs both passes with ``torch.compile`` (forward and backward); the base model is not replaced.

        For steps bound by kernel launches rather than arithmetic (small batches on a GPU); each new batch shape
        compiles first.

        Args:
            **compile_options: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ...).
        """
        self._compiled_decoder_pass = torch.compile(self._eager_decoder_pass, **compile_options)
        self._compiled_virtual_token_pass = torch.compile(self._eager_virtual_token_pass, **compile_options)
