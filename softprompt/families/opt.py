"""OPT: learned absolute positions (offset by 2), and in some sizes word embeddings narrower than the model.

opt-350m's word embeddings are 512 wide; ``project_in`` lifts them to the 1024-wide layers and ``project_out``
brings the final hidden states back to 512 for the tied head. So virtual tokens are C = 512 wide (the embedding
width, ``word_embed_proj_dim``), while a layer's keys and values are H x D = 1024. PEFT sizes virtual tokens by
the hidden size and fails on such models. OPT derives positions from the mask itself; softprompt passes the same
positions explicitly, as for every family that takes them.
"""

from __future__ import annotations

from transformers import OPTConfig

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> OPTConfig:
    """opt-350m's layout at a tiny size: 2 layers of C 32 under 16-wide embeddings, 4 heads of 8."""
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=96, do_layer_norm_before=False, init_std=0.3,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=True,
    )


def opt_350m() -> OPTConfig:
    """facebook/opt-350m's published config.json (331,196,416 parameters)."""
    return OPTConfig(
        vocab_size=50272, hidden_size=1024, word_embed_proj_dim=512, ffn_dim=4096, num_hidden_layers=24,
        num_attention_heads=16, max_position_embeddings=2048, do_layer_norm_before=False,
        activation_function="relu", bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.1,
        tie_word_embeddings=True,
    )


FAMILY = Family(
    name="OPT",
    model_types=("opt",),
    positions="position_ids",
    position_encoding="learned",
    tiny_config=tiny_config,
    known_configs={"facebook/opt-350m": opt_350m},
    embedding_width_field="word_embed_proj_dim",
    position_table_field="max_position_embeddings",
    needed="virtual tokens as wide as the word embeddings, not the hidden size (opt-350m: 512, not 1024)",
    attention=AttentionAccess(module="self_attn", rotary=False, output="out_proj"),
)
