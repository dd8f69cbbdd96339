"""GPT-NeoX and Pythia: rotary positions on part of each head (``partial_rotary_factor``), parallel residuals.

Positions come from ``position_ids`` (default ``arange(T)`` + the cache length, the attention mask ignored): a
left-padded row needs them explicitly to compute what it computes alone.
"""

from __future__ import annotations

from transformers import GPTNeoXConfig

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> GPTNeoXConfig:
    """2 layers, C 32, 4 heads of 8, a quarter of each head rotated."""
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )


def pythia_410m() -> GPTNeoXConfig:
    """EleutherAI/pythia-410m's published config (405,334,016 parameters)."""
    return GPTNeoXConfig(
        vocab_size=50304, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=2048, use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )


FAMILY = Family(
    name="GPT-NeoX",
    model_types=("gpt_neox",),
    positions="position_ids",
    position_encoding="partial rotary",
    tiny_config=tiny_config,
    known_configs={"EleutherAI/pythia-410m": pythia_410m},
    needed="explicit position_ids: its rotary positions ignore the mask, so left padding shifted a row",
    attention=AttentionAccess(module="attention", fused="query_key_value", fused_layout="heads", output="dense"),
)
