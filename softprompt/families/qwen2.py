"""Qwen2 and Qwen2.5: Llama's rotary, grouped-query layers, with biased query/key/value projections.

Sliding-window layers exist (``use_sliding_window``, off in the published models); where they are on, prompt +
text must fit the window, as for Mistral.
"""

from __future__ import annotations

from transformers import Qwen2Config

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> Qwen2Config:
    """2 layers, C 32, 4 query heads sharing 2 key/value heads of 8."""
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=True,
    )


def qwen2_5_0_5b() -> Qwen2Config:
    """Qwen/Qwen2.5-0.5B's published config.json (494,032,768 parameters)."""
    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, use_sliding_window=False, sliding_window=32768,
        max_window_layers=24, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


FAMILY = Family(
    name="Qwen2",
    model_types=("qwen2",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_config,
    known_configs={"Qwen/Qwen2.5-0.5B": qwen2_5_0_5b},
    needed="as Llama (K key/value heads, explicit position_ids)",
    attention=AttentionAccess(module="self_attn"),  # biased q/k/v projections; o_proj has no bias
)
