"""Weights repacked for a kernel, made once and reused while the weight is unchanged.

The Triton and the CUDA conv (conv2d_bias_act.py) want weights in their own layouts. An
entry is keyed on the weight's storage address, dtype and layout and on the packing (the
function and its arguments), and checked against the tensor's in-place version counter and
a weak reference to it, so a changed weight is repacked and a freed weight whose address is
reused is never mistaken for the cached one.
"""

import collections
import threading
import weakref
from typing import Callable

import torch


def is_traced(t: torch.Tensor) -> bool:
    """The fake / functional / proxied tensors of torch.compile and torch.export: they
    cannot be cached by address, and the repacking is traced as plain torch ops."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return True
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        return True
    return torch._is_functional_tensor(t)


class PackedWeightCache:
    """At most ``size`` repacked weights, least recently used dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._entries: "collections.OrderedDict" = collections.OrderedDict()

    def get(self, weight: torch.Tensor, pack: Callable[..., torch.Tensor], *args):
        """``pack(weight, *args)``, from the cache when ``weight`` is unchanged since it was
        packed so. Inference and traced tensors are packed every call: they have no usable
        version counter or address."""
        if is_traced(weight) or weight.is_inference():
            return pack(weight, *args)
        key = (weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape), weight.stride(), pack) + args
        version = weight._version
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is not None and entry[1] == version:
                self._entries.move_to_end(key)
                return entry[2]
        with torch.no_grad():
            packed = pack(weight, *args)
        if packed.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            # A view: the weight was already in the kernel's layout, there is nothing to save.
            # Kept, the view would keep the weight alive (no entry may: the weight then dies,
            # running ``forget``, wherever the entry is dropped, also under the lock).
            return packed

        def forget(dead_ref, key=key):
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] is dead_ref:
                    del self._entries[key]

        with self._lock:
            self._entries[key] = (weakref.ref(weight, forget), version, packed)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return packed

    def clear(self):
        """Forget every packed weight (needed only after a weight was changed behind
        autograd's version counter, e.g. through ``param.data.copy_``)."""
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)
