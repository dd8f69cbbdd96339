"""Gemma 2 and Gemma 3 (text): rotary, grouped-query layers with a large head size, scaled embeddings,
alternating sliding-window layers, and (Gemma 2) soft-capped final logits.

- Embeddings: the embedding module multiplies word embeddings by sqrt(hidden); ``inputs_embeds`` are used as given.
  So virtual tokens are not scaled (PEFT's behaviour too), and TEXT / SAMPLE_VOCAB init, which look the ids up in
  that module, start from the scaled rows.
- Heads: D comes from the config (gemma-2-2b: 8 query heads of 256 under C 2304), K from ``num_key_value_heads``.
- Logits: Gemma 2 ends with ``logits = cap * tanh(logits / cap)`` (``final_logit_softcapping``, 30 in gemma-2-2b),
  which the training loss's label-only head applies too. Attention scores are soft-capped inside the layers.
- Windows: every other Gemma 2 layer (five of six in Gemma 3) attends within ``sliding_window`` positions; prompt +
  text must fit the window (`softprompt.positions.check_positions`).
"""

from __future__ import annotations

from transformers import Gemma2Config, Gemma3TextConfig

from softprompt.families.family import AttentionAccess, Family


def tiny_gemma2_config(vocab_size: int) -> Gemma2Config:
    """2 layers (one sliding, one global), C 32, 4 query heads sharing 2 key/value heads of D 16; soft-capping at
    5 so that it visibly bends these random logits."""
    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0,
        attn_logit_softcapping=5.0, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=True,
    )


def tiny_gemma3_config(vocab_size: int) -> Gemma3TextConfig:
    """2 layers (one sliding, one global), C 32, 4 query heads sharing 1 key/value head of D 16."""
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], initializer_range=0.3, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, tie_word_embeddings=True,
    )


def gemma_2_2b() -> Gemma2Config:
    """google/gemma-2-2b's published config.json (2,614,341,888 parameters)."""
    return Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def gemma_3_1b() -> Gemma3TextConfig:
    """google/gemma-3-1b-pt's published config.json (999,885,952 parameters): one global layer in six."""
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
        layer_types=["full_attention" if (layer + 1) % 6 == 0 else "sliding_attention" for layer in range(26)],
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )


GEMMA2 = Family(
    name="Gemma 2",
    model_types=("gemma2",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_gemma2_config,
    known_configs={"google/gemma-2-2b": gemma_2_2b},
    embedding_scale="sqrt_hidden_size",
    logit_softcapping_field="final_logit_softcapping",
    needed="D from the config, soft-capped logits in the label-only loss head, the sliding window",
    attention=AttentionAccess(module="self_attn", softcap="attn_logit_softcapping"),
)

GEMMA3 = Family(
    name="Gemma 3",
    model_types=("gemma3_text",),
    positions="position_ids",
    position_encoding="rotary",
    tiny_config=tiny_gemma3_config,
    known_configs={"google/gemma-3-1b-pt": gemma_3_1b},
    embedding_scale="sqrt_hidden_size",
    logit_softcapping_field="final_logit_softcapping",
    needed="D from the config, one key/value head, the sliding window (512 in gemma-3-1b)",
    # Gemma 3 keeps an attn_logit_softcapping attribute but does not apply it: no softcap here.
    attention=AttentionAccess(module="self_attn", query_norm="q_norm", key_norm="k_norm"),
)
