"""GPT-2: learned absolute positions, full multi-head attention.

Each position adds a learned vector from a table of ``n_positions`` rows to the token embedding; the position comes
from ``position_ids`` (default ``arange(T)`` + the cache length, the attention mask ignored). Virtual tokens take
positions 0..P-1 and the text P, P + 1, ...: together they must fit the table.
"""

from __future__ import annotations

from transformers import GPT2Config

from softprompt.families.family import AttentionAccess, Family


def tiny_config(vocab_size: int) -> GPT2Config:
    """2 layers, C 32, 4 heads of 8, a 96-position table; no dropout (GPT-2's 0.1 would make training-mode
    passes differ by chance)."""
    return GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=96, initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=True,
    )


def gpt2() -> GPT2Config:
    """openai-community/gpt2's published config.json (124,439,808 parameters)."""
    return GPT2Config(
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
    )


FAMILY = Family(
    name="GPT-2",
    model_types=("gpt2",),
    positions="position_ids",
    position_encoding="learned",
    tiny_config=tiny_config,
    known_configs={"gpt2": gpt2, "openai-community/gpt2": gpt2},
    position_table_field="n_positions",
    needed="explicit position_ids: its learned positions ignore the mask, so left padding shifted every row",
    # PEFT's composition: keys and values through c_attn (bias included), scores scaled by 1 / sqrt(D), the
    # attended values added after c_proj without passing through it.
    attention=AttentionAccess(module="attn", fused="c_attn", rotary=False, scale=None, output=None),
)
