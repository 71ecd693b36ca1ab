"""Key/value caches that keep every position, so that one prompt's cache can be shared, sliced
and expanded over many continuations.

Left to itself, a model with sliding-window attention (Mistral, Gemma-2) builds a cache whose
sliding layers keep only the last window of positions; slicing such a cache by position, or
attending to it under a hand-made mask, is wrong once a sequence outgrows the window. `full_cache`
asks the model for a plain cache instead: every layer keeps every position, and the model's own
attention mask still applies its window. Only a hand-made attention mask bypasses the window,
which `window_of` says when to avoid.
"""

from __future__ import annotations

import torch


def full_cache():
    """An empty cache whose layers keep every position (no config: no sliding layers)."""
    from transformers import DynamicCache

    return DynamicCache()


def layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(keys, values) [B, heads, positions, dim] of every layer, or None when the cache has no
    per-layer tensors (none filled) or a layer keeps only a window (it may have dropped positions)."""
    own = getattr(cache, "layers", None)
    if not own or any(getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None for layer in own):
        return None
    return [(layer.keys, layer.values) for layer in own]


def cache_of(layers) -> object:
    """A plain cache over these (keys, values). It never writes them in place (an update
    concatenates), so the tensors may be shared, expanded or sliced views."""
    from transformers import DynamicCache

    return DynamicCache(list(layers))


def window_of(model) -> int | None:
    """The model's sliding attention window in positions (None: every layer attends to all)."""
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window else None
