"""BLOOM and bloomz: ALiBi positions, built by the model from the attention mask.

BLOOM adds to every attention score a per-head slope times the key's position, and takes that position from
``cumsum(attention_mask) - 1``: slots the mask hides (padding, a shorter adapter's unused prefix slots) shift no
position, and the model takes no ``position_ids``. Its cache holds H heads of size C / H per layer.
"""

from __future__ import annotations

from functools import partial

from transformers import BloomConfig

from softprompt.families.family import AttentionAccess, Family

BLOOM_VOCAB_SIZE = 250880
"""V of every BLOOM model (rows of the embedding matrix; the tokenizer produces fewer ids)."""

# (C hidden, L layers, H heads) of each size, from the published configs.
BLOOM_SHAPES: dict[str, tuple[int, int, int]] = {
    "560m": (1024, 24, 16),
    "1b1": (1536, 24, 16),
    "1b7": (2048, 24, 16),
    "3b": (2560, 30, 32),
    "7b1": (4096, 30, 32),
}


def bloom_config(
    hidden_size: int, num_layers: int, num_heads: int, vocab_size: int = BLOOM_VOCAB_SIZE, **overrides
) -> BloomConfig:
    """A BLOOM config of the given shape, with BLOOM's token ids (unk 0, bos 1, eos 2, pad 3) and tied embeddings."""
    return BloomConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
        **overrides,
    )


def tiny_config(vocab_size: int) -> BloomConfig:
    """2 layers, C 32, 4 heads of 8; a wide initialization so that random logits are not flat."""
    return bloom_config(32, 2, 4, vocab_size, initializer_range=0.3)


FAMILY = Family(
    name="BLOOM",
    model_types=("bloom",),
    positions="attention_mask",
    position_encoding="ALiBi",
    tiny_config=tiny_config,
    known_configs={
        f"bigscience/{name}-{size}": partial(bloom_config, *shape)
        for name in ("bloom", "bloomz")
        for size, shape in BLOOM_SHAPES.items()
    },
    needed="the reference family: ALiBi positions come from the mask, so hidden slots shift nothing",
    # ALiBi adds slope * key position to a score: keys at no position get no bias, as rotary families' adapter
    # keys get no rotation.
    attention=AttentionAccess(module="self_attention", fused="query_key_value", fused_layout="heads", rotary=False,
                              scale="inv_norm_factor", output="dense"),
)
