"""`.to()` between this process and a worker is differentiable both ways, as between CPU and CUDA:
gradients of a local tensor sent with `.to(dev)` arrive in its `.grad`, and a pointer fetched with
`.cpu()` / `.to("cpu")` passes the gradient back to the worker."""
from __future__ import annotations

import torch

import torchremote as tr


def test_a_local_leaf_sent_with_to_gets_its_gradient(bob):
    local = torch.randn(3, requires_grad=True)
    copy = local.to(bob.device)
    assert copy.requires_grad and not copy.is_leaf and copy.grad_fn.name() == "ToCopyBackward0"
    (copy * copy).sum().backward()
    torch.testing.assert_close(local.grad, 2 * local.detach())
    assert copy.grad is None  # a non-leaf keeps no .grad, as in torch
    (local.to(bob.device) * 3).sum().backward()  # accumulates, as twice locally would
    torch.testing.assert_close(local.grad, 2 * local.detach() + 3)


def test_the_gradient_goes_on_through_local_history(bob):
    a = torch.randn(4, requires_grad=True)
    expected_a = a.detach().clone().requires_grad_()
    torch.sin(3 * expected_a).sum().backward()
    (3 * a).to(bob.device).sin().sum().backward()  # the copy itself is dropped at once
    torch.testing.assert_close(a.grad, expected_a.grad)


def test_a_model_input_and_its_gradient_like_local(bob):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x_local = torch.randn(5, 4, requires_grad=True)
    model(x_local).square().sum().backward()
    expected = x_local.grad.clone()
    x_local.grad = None
    model.to(bob.device)
    model(x_local.to(bob.device)).square().sum().backward()
    torch.testing.assert_close(x_local.grad, expected)


def test_a_pointer_fetched_with_cpu_or_to_passes_gradients_back(bob):
    x = torch.randn(3).to(bob.device).requires_grad_()
    fetched = x.cpu()
    assert fetched.requires_grad and fetched.grad_fn is not None
    (fetched * 2).sum().backward()
    assert torch.equal(x.grad.get(), torch.full((3,), 2.))
    x.grad = None
    (x.to("cpu") ** 2).sum().backward()
    torch.testing.assert_close(x.grad.get(), 2 * x.get())
    with torch.no_grad():
        assert not x.cpu().requires_grad
    assert not x.get().requires_grad  # get() is a copy of the data, never part of a graph
    assert not torch.ones(2).to(bob.device).cpu().requires_grad


def test_autograd_grad_from_a_local_copy_back_to_its_pointer(bob):
    x0 = torch.randn(3, 4)
    x = x0.clone().send(bob).requires_grad_()
    local = x0.clone().requires_grad_()
    for fetch in (lambda t: t.cpu(), lambda t: t.to("cpu", torch.float64)):
        remote_out = (fetch(x * 2) ** 2).sum()          # worker, then here
        local_out = (fetch(local * 2) ** 2).sum()
        (got,) = torch.autograd.grad(remote_out, [x])
        (expected,) = torch.autograd.grad(local_out, [local])
        assert torch.allclose(got.get(), expected.to(got.dtype))
    assert x.grad is None  # autograd.grad hands gradients back; it accumulates nothing
