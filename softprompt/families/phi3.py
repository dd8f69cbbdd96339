"""Phi-3: rotary, fused query/key/value projection, grouped-query attention where K < H, a sliding window.

Phi-3-mini-4k attends within a 2047-position window in every layer: prompt + text must fit it, as for Mistral.
"""

from __future__ import annotations

from transformers import Phi3Config

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> Phi3Config:
    """2 layers, C 32, 4 query heads sharing 2 key/value heads of 8."""
    return Phi3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
    )


def phi_3_mini_4k() -> Phi3Config:
    """microsoft/Phi-3-mini-4k-instruct's published config.json (3,821,079,552 parameters)."""
    return Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        sliding_window=2047, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


FAMILY = Family(
    name="Phi-3",
    model_types=("phi3",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_config,
    known_configs={"microsoft/Phi-3-mini-4k-instruct": phi_3_mini_4k},
    needed="as Llama, plus the sliding window: prompt + text must fit it",
    attention=AttentionAccess(module="self_attn", fused="qkv_proj"),  # [q H*D | k K*D | v K*D]
)
