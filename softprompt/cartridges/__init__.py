"""Cartridges beyond the method itself: PEFT's helpers (initialize from a text or a cache, compose saved cartridges).

The method (the trainable cache, its config, how it enters the model) is ``softprompt/methods/cartridge.py``.
"""

from softprompt.cartridges.adapters import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    load_kv_table,
)

__all__ = [
    "compose_cartridge_adapters",
    "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text",
    "load_kv_table",
]
