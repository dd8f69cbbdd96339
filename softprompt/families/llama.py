"""Llama (Llama 2, Llama 3.x): rotary positions and grouped-query attention.

Queries are rotated at the positions the model is given (``position_ids``, default ``arange(T)`` + the cache length,
the attention mask ignored), keys when they are computed: a prefix's keys are used as they are. Each layer caches
K key/value heads of size D (K < H with grouped-query attention), so a prefix is ``[L, 2, K, D]`` per position.
"""

from __future__ import annotations

from transformers import LlamaConfig

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> LlamaConfig:
    """2 layers, C 32, 4 query heads sharing 2 key/value heads of 8."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
    )


def llama_3_2_1b() -> LlamaConfig:
    """meta-llama/Llama-3.2-1B's published config.json (1,235,814,400 parameters)."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                         "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    )


FAMILY = Family(
    name="Llama",
    model_types=("llama",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_config,
    known_configs={"meta-llama/Llama-3.2-1B": llama_3_2_1b},
    needed="K key/value heads in the prefix; explicit position_ids, since rotary positions ignore the mask",
    # PEFT's composition (its own adaption-prompt family): o_proj called whole, bias included.
    attention=AttentionAccess(module="self_attn", output_bias=True),
)
