"""Calls a RemoteTensor answers without the generic dispatch path: a registry dispatch consults.

`LOCAL_QUERIES` are answered from the meta stand-in, with no message. `SPECIAL` maps a torch callable
to its own handler (`@implements(func)`); the handlers live in the modules above dispatch
(`special.py`, `autograd_calls.py`), which register themselves when the client package is imported.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

# --- calls answered on the client, from the meta stand-in, without a message ----------------------
# (shape, size(), dtype, dim() and the dtype tests are answered from the pointer's own metadata in
# special.py; requires_grad, is_leaf, grad_fn and .grad in autograd_calls.py, from the bookkeeping)

_T = torch.Tensor
LOCAL_QUERIES: frozenset = frozenset({
    *(getattr(_T, p).__get__ for p in (
        "layout", "is_sparse",
        "is_sparse_csr", "is_quantized", "is_mkldnn", "is_nested", "is_cuda", "is_xpu", "is_mps",
        "is_cpu", "itemsize", "nbytes", "output_nr", "_version",
    )),
    _T.stride, _T.numel, _T.nelement, _T.element_size,
    _T.is_contiguous, _T.is_signed, _T.storage_offset,
    _T.is_conj, _T.is_neg, _T.is_inference, _T.__len__, _T.dim_order,
    torch.numel, torch.is_conj, torch.is_neg,
    torch.is_inference, torch.is_same_size, torch.result_type,
    torch.ops.aten._has_same_storage_numel.default,  # forward AD: may a tangent be used as it is
})

# --- the few calls that need their own implementation: `@implements(func)` -----------------------

SPECIAL: dict[Any, Callable] = {}


def implements(*funcs: Any) -> Callable[[Callable], Callable]:
    """Register `handler(func, args, kwargs)` for calls the generic path must not take."""
    def register(handler: Callable) -> Callable:
        for f in funcs:
            SPECIAL[f] = handler
        return handler
    return register
