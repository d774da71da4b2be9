"""ops.py: every overridable torch callable has a name that resolves back to it; nothing else does."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import get_overridable_functions

from torchremote.wire import ops
from torchremote.wire.errors import WorkerPermissionError


def test_every_named_callable_resolves_to_itself():
    count = 0
    for funcs in get_overridable_functions().values():
        for f in funcs:
            name = ops.name_of(f)
            if name is not None:
                assert ops.resolve(name) == f, name
                count += 1
    assert count > 1200


@pytest.mark.parametrize("func", [
    torch.add, torch.Tensor.add_, torch.Tensor.__radd__, torch.Tensor.__rmatmul__, torch.Tensor.T.__get__,
    torch.Tensor.mT.__get__, torch.Tensor.real.__get__, torch.Tensor.requires_grad.__set__,
    torch.nn.functional.relu, torch.nn.functional.linear, torch.linalg.norm, torch.fft.fft,
    torch.special.erf, torch.ops.aten.zero_.default, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
])
def test_names_of_the_call_kinds(func):
    name = ops.name_of(func)
    assert name is not None and ops.resolve(name) == func


@pytest.mark.parametrize("name", [
    "os.system", "builtins.eval", "torch.load", "torch.save", "torch.Tensor.__reduce_ex__",
    "torch.Tensor.__setstate__", "torch.Tensor.untyped_storage", "torch.Tensor.register_hook",
    "torch.Tensor.share_memory_", "aten.from_file.default", "torch.Tensor.__class__.__get__",
    "torch.Tensor.__init_subclass__", "subprocess.run", "torch.hub.load", "", "aten..",
])
def test_names_outside_the_allow_list_are_refused(name):
    with pytest.raises(WorkerPermissionError, match="allow-list"):
        ops.resolve(name)


@pytest.mark.parametrize("module,name", [("torch", "add"), ("os", "system"), ("torch.Tensor", "add")])
def test_a_callable_disguised_as_another_has_no_name(module, name):
    def fake(*a):
        pass
    fake.__module__, fake.__qualname__, fake.__name__ = module, name, name
    assert ops.name_of(fake) is None
