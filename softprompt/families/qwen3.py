"""Qwen3: Llama's rotary, grouped-query layers, with a head size set apart from C / H and normed queries/keys.

Qwen3-0.6B has C 1024 and 16 query heads but heads of D 128, so a prefix is ``[L, 2, K, 128]`` per position, not
``[L, 2, K, 64]``: D comes from the config's ``head_dim``, never from C / H.
"""

from __future__ import annotations

from transformers import Qwen3Config

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> Qwen3Config:
    """2 layers, C 32, 4 query heads sharing 2 key/value heads of D 16 (4 x 16 != 32)."""
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=True,
    )


def qwen3_0_6b() -> Qwen3Config:
    """Qwen/Qwen3-0.6B's published config.json (596,049,920 parameters)."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, attention_bias=False,
        use_sliding_window=False, max_window_layers=28, rms_norm_eps=1e-6, hidden_act="silu",
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


FAMILY = Family(
    name="Qwen3",
    model_types=("qwen3",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_config,
    known_configs={"Qwen/Qwen3-0.6B": qwen3_0_6b},
    needed="as Llama, with D from the config's head_dim (not C / H)",
    attention=AttentionAccess(module="self_attn", query_norm="q_norm", key_norm="k_norm"),
)
