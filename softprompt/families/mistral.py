"""Mistral: Llama's rotary, grouped-query layers, with a sliding attention window in every layer (v0.1).

A layer lets a query see only keys fewer than ``sliding_window`` positions before it. A prefix or virtual tokens
sit before every real token, so a window shorter than prefix + text would hide them from the later tokens, in
training and in generation alike; softprompt refuses such inputs rather than let the prompt fade unseen
(`softprompt.positions.check_positions`).
"""

from __future__ import annotations

from transformers import MistralConfig

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> MistralConfig:
    """2 layers, C 32, 4 query heads sharing 2 key/value heads of 8, a 64-position window (never reached here)."""
    return MistralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=64, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, tie_word_embeddings=False,
    )


def mistral_7b_v0_1() -> MistralConfig:
    """mistralai/Mistral-7B-v0.1's published config (7,241,732,096 parameters)."""
    return MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


FAMILY = Family(
    name="Mistral",
    model_types=("mistral",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_config,
    known_configs={"mistralai/Mistral-7B-v0.1": mistral_7b_v0_1},
    needed="as Llama, plus the sliding window: prompt + text must fit it",
    attention=AttentionAccess(module="self_attn", output_bias=True),  # PEFT's composition, as Llama
)
