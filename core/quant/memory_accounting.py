"""Bytes a model's tensors really occupy, counting each storage once (tied weights, views) and including
bitsandbytes state that lives outside parameters/buffers (4-bit quant_state, int8 SCB)."""
from __future__ import annotations

import torch
from torch import nn


def bnb_state_tensors(module: nn.Module):
    """bitsandbytes tensors hanging off a module's weight or state rather than registered on it."""
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)  # Params4bit
    while qs is not None:  # nested (double-quant) states chain through state2
        yield from (getattr(qs, k, None) for k in ("absmax", "code", "offset"))
        qs = getattr(qs, "state2", None)
    yield getattr(weight, "CB", None)  # Int8Params (moved to module.state after the first forward)
    yield getattr(weight, "SCB", None)
    state = getattr(module, "state", None)  # bnb MatmulLtState
    if state is not None and not isinstance(state, (dict, torch.Tensor)):
        yield from vars(state).values()


def tensor_bytes(tensors) -> int:
    """Sum of the distinct storages behind these tensors (non-tensors and meta tensors are ignored)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def module_bytes(model: nn.Module) -> int:
    def all_tensors():
        yield from (p for _, p in model.named_parameters(remove_duplicate=False))
        yield from (b for _, b in model.named_buffers(remove_duplicate=False))
        for m in model.modules():
            yield from bnb_state_tensors(m)

    return tensor_bytes(all_tensors())
