"""Copies of a weight in another layout (packed for a product), made once and kept while the weight lives and stays
unchanged: made again after an in-place change (its version moves) or a new storage (`w.data = other`). A write
through `w.data`, which torch does not track, would go unseen."""

from collections.abc import Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_copies = WeakIdKeyDictionary()  # weight -> {key: (its version, the copy)}; dropped with the weight


def derived(w: torch.Tensor, key: Hashable, make: Callable[[torch.Tensor], object]):
    """make(w) for the weight w as it is now, made once per key (the layout and dtype it stands for)."""
    version = (0 if w.is_inference() else w._version, w.data_ptr())
    copies = _copies.setdefault(w, {})
    entry = copies.get(key)
    if entry is None or entry[0] != version:
        with torch.no_grad():
            entry = copies[key] = (version, make(w.detach()))
    return entry[1]
