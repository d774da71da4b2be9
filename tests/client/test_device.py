"""The `remote` device as PyTorch's own devices behave: what torch's C++ asks of a backend is
registered, so no call aborts the process; `torch.remote` answers what `torch.cuda` users call;
factories honour `requires_grad`; torch.func transforms run on pointers and equal local."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import torchremote as tr
from conftest import ROOT


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


CALLS_THAT_REACH_CPP = """
    import torch, torchremote as tr
    from torch.utils.checkpoint import checkpoint
    server = tr.start_worker(id="w")
    w = tr.connect(server.url)
    dev = w.device
    x = torch.randn(3).to(dev)

    def attempt(name, fn):
        try:
            fn()
            print(name, "|", "ran")
        except Exception as e:  # a Python exception is fine here; an abort is not
            print(name, "|", "raised", type(e).__name__, e)

    lin = torch.nn.Linear(3, 3).to(dev)
    attempt("func.grad", lambda: torch.func.grad(lambda t: (t * t).sum())(x).get())
    attempt("func.jacrev", lambda: torch.func.jacrev(torch.sin)(x).get())
    attempt("func.vmap", lambda: torch.func.vmap(torch.sin)(x).get())
    attempt("to from a tensor that requires grad", lambda: torch.randn(3, requires_grad=True).to(dev))
    attempt("to('remote')", lambda: torch.ones(2).to("remote").get())
    attempt("to(current_accelerator())", lambda: torch.ones(2).to(torch.accelerator.current_accelerator()).get())
    attempt("autocast", lambda: torch.autocast(dev.type, dtype=torch.bfloat16).__enter__())
    attempt("checkpoint", lambda: checkpoint(lin, x.detach().requires_grad_(), use_reentrant=False).sum().backward())
    attempt("compile", lambda: torch.compile(lin)(x))
    attempt("save", lambda: torch.save({"x": x}, "/dev/null"))
    print("reached the end")
"""


def test_calls_that_reach_torchs_cpp_never_abort():
    done = _run(CALLS_THAT_REACH_CPP)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "reached the end"
    outcome = dict(line.split(" | ", 1) for line in lines[:-1] if " | " in line)
    for name in ("func.grad", "func.jacrev", "func.vmap", "to from a tensor that requires grad", "to('remote')",
                 "to(current_accelerator())", "autocast", "checkpoint", "compile", "save"):
        assert outcome[name] == "ran", (name, done.stderr[-2000:])
    assert len(outcome) == 10  # every call came back to Python, one way or the other


def test_an_uncaught_exception_after_a_backward_exits_cleanly():
    script = """
        import torch, torchremote as tr
        server = tr.start_worker(id="w")
        w = tr.connect(server.url)
        m = torch.nn.Linear(4, 2).to(w.device)
        m(torch.ones(3, 4).to(w.device)).sum().backward()
        raise ValueError("uncaught")
    """
    for _ in range(4):  # the abort came about one run in four
        done = _run(script)
        assert done.returncode == 1 and "ValueError: uncaught" in done.stderr
        assert "terminate called" not in done.stderr


def test_torch_distributed_and_accelerator_keep_working_without_a_worker():
    done = _run("""
        import os, socket, torch, torchremote as tr, torch.distributed as dist
        assert not torch.accelerator.is_available()  # nothing connected: scripts fall back to the CPU
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
        dist.barrier()
        t = torch.ones(2)
        dist.all_reduce(t)
        dist.destroy_process_group()
        print("ok", t.tolist())
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok [1.0, 1.0]", done.stderr[-2000:]


def test_factories_with_requires_grad_make_leaves_that_require_grad(bob):
    for x in (torch.randn(4, 3, device=bob.device, requires_grad=True),
              torch.tensor([[1., 2., 3.]], device=bob.device, requires_grad=True),
              torch.zeros(2, 3, device=bob.device).requires_grad_()):
        assert x.requires_grad and x.is_leaf and x.grad_fn is None
        (x * 2).sum().backward()
        assert torch.equal(x.grad.get(), torch.full(x.shape, 2.))
    assert not torch.zeros(2, device=bob.device).requires_grad


def test_torch_func_transforms_on_pointers_equal_local():
    """torch.func runs through torch's C++ autograd engine, which keeps one queue per device index
    of a Python backend: the first worker of a process (remote:0) only. Others get torch's error."""
    done = _run("""
        import torch, torchremote as tr
        server = tr.start_worker(id="w")
        first, second = tr.connect(server.url), tr.connect(server.url)
        assert first.device.index == 0
        local = torch.randn(3)
        x = local.to(first.device)
        f = lambda t: (t.sin() * t).sum()
        for transform in (torch.func.grad(f), torch.func.jacrev(torch.sin), torch.func.jacfwd(torch.sin),
                          torch.func.hessian(f), torch.func.vmap(torch.sin)):
            torch.testing.assert_close(transform(x).get(), transform(local))
        out, pull = torch.func.vjp(torch.sin, x)
        want_out, want_pull = torch.func.vjp(torch.sin, local)
        torch.testing.assert_close(pull(out)[0].get(), want_pull(want_out)[0])
        model = torch.nn.Linear(3, 2)
        params = {k: v.detach().to(first.device) for k, v in model.named_parameters()}
        torch.testing.assert_close(torch.func.functional_call(model, params, (x,)).get(), model(local))
        try:
            torch.func.grad(f)(local.to(second.device))
        except RuntimeError as e:
            print("remote:1 refused:", "device_ready_queues_" in str(e))
        else:
            print("remote:1 ran")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() in ("remote:1 refused: True", "remote:1 ran")


def test_forward_mode_ad_on_pointers_equals_local(bob):
    """Tangents ride along on the client, as torch's C++ attaches them, and each tangent formula's
    ops run on the worker: torch.func.jvp, a jvp through functional_call, and fwAD.dual_level."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jvp

    x, v = torch.randn(3, 3), torch.randn(3, 3)
    rx, rv = x.send(bob), v.send(bob)
    for f in (torch.sin, torch.exp, torch.tanh, lambda t: t.sum(), lambda t: t.T @ t,
              lambda t: t + t, lambda t: t.T.sin(), lambda t: t.view(9).cos(),
              # a Python scalar operand (torch's formula asks for x.to("meta")); views at an offset
              lambda t: t * 2, lambda t: 1 - t / 3, lambda t: t[1:], lambda t: t.narrow(1, 1, 2).exp(),
              lambda t: t[0] * torch.tensor(2.)):
        (want, want_t), (out, out_t) = jvp(f, (x,), (v,)), jvp(f, (rx,), (rv,))
        assert isinstance(out_t, tr.RemoteTensor)
        torch.testing.assert_close(out.get(), want)
        torch.testing.assert_close(out_t.get(), want_t)

    model = torch.nn.Linear(3, 2)
    remote_model = tr.send(copy.deepcopy(model), bob)
    params, remote_params = dict(model.named_parameters()), dict(remote_model.named_parameters())
    ones = {k: torch.ones_like(p) for k, p in params.items()}
    want = jvp(lambda p: functional_call(model, p, (x,)), (params,), (ones,))
    got = jvp(lambda p: functional_call(remote_model, p, (rx,)), (remote_params,),
              ({k: t.send(bob) for k, t in ones.items()},))
    for w, g in zip(want, got):
        torch.testing.assert_close(g.get(), w)

    with fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(fwAD.make_dual(rx, rv).sin() * rx)
        _, want_t = fwAD.unpack_dual(fwAD.make_dual(x, v).sin() * x)
    torch.testing.assert_close(tangent.get(), want_t)


def test_like_factories_make_their_tensor_where_device_says(bob, server, monkeypatch):
    """As torch: only the metadata is used, so a pointer's `*_like` for another device sends nothing."""
    x = torch.randn(3, 2).send(bob)
    calls = []
    for name in ("_call", "_call_sync", "_request"):
        monkeypatch.setattr(bob, name, lambda *a, _f=getattr(bob, name), **k: calls.append(a) or _f(*a, **k))
    on_cpu = torch.zeros_like(x, device="cpu", dtype=torch.float64)
    assert type(on_cpu) is torch.Tensor and torch.equal(on_cpu, torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(x.new_full((2,), 5., device="cpu"), torch.full((2,), 5.))
    as_meta = x[1:].to("meta")
    assert as_meta.device.type == "meta" and as_meta.shape == (2, 2) and as_meta.stride() == (2, 1)
    assert [name for name, *_ in calls] == ["torch.Tensor.__getitem__"]  # x[1:] only: no data moved
    alice = tr.connect(server.url)
    try:
        on_alice = torch.ones_like(x, device=alice.device)
        assert on_alice.worker is alice and torch.equal(on_alice.get(), torch.ones(3, 2))
    finally:
        alice.close()


def test_factories_run_under_a_torch_dispatch_mode(bob):
    """While a mode is active torch reaches a backend's kernels through a table keyed by operator
    name: every factory that reaches the backend has a kernel there (a fallback has none)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from torchremote.client.backend import FACTORIES

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for mode in (Seen(), FlopCounterMode(display=False)):
        with mode:
            made = (torch.tensor([1., 2.], device=bob.device), torch.zeros(2, device=bob.device),
                    torch.empty(2, device=bob.device).fill_(3.), torch.tril_indices(3, 3, device=bob.device))
        assert [t.get().sum().item() for t in made] == [3., 0., 6., 12]
    reaching_the_fallback = set()
    for name in torch._C._dispatch_get_all_op_names():
        packet, _, overload = name.removeprefix("aten::").partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None) if name.startswith("aten::") else None
        if op is None or not any(a.name == "device" for a in op._schema.arguments):
            continue
        if any("Tensor" in str(a.type) for a in op._schema.arguments):
            continue  # dispatched on its tensor arguments
        entry = next((line for line in torch._C._dispatch_dump_table(name).splitlines()
                      if line.startswith("PrivateUse1:")), "")
        if "[backend fallback]" in entry:
            reaching_the_fallback.add(name.removeprefix("aten::"))
    assert reaching_the_fallback == set(), reaching_the_fallback  # each has a kernel of its own
    assert "tril_indices" in FACTORIES


def test_tracing_transforms_refuse_pointers_clearly(bob):
    """make_fx would record the client's own bookkeeping, not the worker's ops: refused by name."""
    with pytest.raises(NotImplementedError, match="make_fx cannot trace RemoteTensors"):
        torch.func.linearize(torch.sin, torch.randn(3).send(bob))


def test_torch_remote_answers_what_torch_cuda_users_call():
    done = _run("""
        import torch, torchremote as tr
        server = tr.start_worker(id="bob")
        a, b = tr.connect(server.url), tr.connect(server.url)
        remote = torch.remote
        assert remote.is_available() and remote.device_count() == 2 and remote.current_device() == 0
        assert torch.ones(1).to("remote").device == a.device == torch.device("remote", 0)
        assert torch.zeros(2, device="remote").device == a.device
        assert torch.ones(1).to(torch.accelerator.current_accelerator()).device == a.device
        remote.set_device(0)
        try:
            remote.set_device(b.device)
        except NotImplementedError as e:
            assert "remote:0" in str(e)
        assert "'bob'" in remote.get_device_name() and "'bob'" in remote.get_device_name(b.device)
        x = torch.ones(3, device=b.device)
        x.add_(1)
        remote.synchronize(b.device)
        remote.manual_seed(7)
        first = torch.randn(4, device="remote").get()
        remote.manual_seed(7)
        assert torch.equal(torch.randn(4, device="remote").get(), first)
        torch.manual_seed(3)  # seeds every connected worker, as it seeds every CUDA device
        on_b = torch.randn(4, device=b.device).get()
        torch.manual_seed(3)
        assert torch.equal(torch.randn(4, device=b.device).get(), on_b)
        assert torch.bfloat16 in remote.get_amp_supported_dtype() and remote.is_bf16_supported()
        try:
            remote.synchronize(torch.device("remote", 127))
        except RuntimeError as e:
            assert "no connected torchremote worker" in str(e)
        a.close(), b.close()
        assert not remote.is_available()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
