"""RemoteTensor semantics: local metadata, pointers not data, aliasing, every output kind."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr


def test_is_a_tensor_and_answers_metadata_without_the_worker(fresh_server):
    bob = tr.connect(fresh_server.url)
    t = torch.randn(2, 3, dtype=torch.float64)
    x = t.send(bob)
    y = x.T.unsqueeze(0)
    fresh_server.stop()  # from here on, any round trip would fail
    assert isinstance(x, torch.Tensor) and isinstance(x, tr.RemoteTensor)
    assert x.shape == (2, 3) and x.dtype == torch.float64 and x.dim() == 2 and x.numel() == 6
    assert x.requires_grad is False and x.is_floating_point() and len(x) == 2
    assert y.shape == (1, 3, 2) and y.stride() == t.T.unsqueeze(0).stride() and not y.is_contiguous()
    assert x.device == torch.device("remote", bob.device.index) and x.device.type == "remote"
    assert x.is_meta is False
    assert repr(x) == f"RemoteTensor(id={x.id}, worker='fresh', shape=(2, 3), dtype=torch.float64)"
    assert str(y).startswith("RemoteTensor(")
    with pytest.raises(tr.WorkerConnectionError):
        x.get()
    bob.close()


def test_send_get_item_tolist_numpy(bob):
    t = torch.tensor([[1.5, -2.0], [3.0, 4.25]])
    x = t.send(bob)
    assert tr.send(t, bob).get().equal(t) and tr.get(x).equal(t)
    got = x.get()
    assert type(got) is torch.Tensor and got.equal(t)
    assert x.get().equal(t)  # get() copies: the pointer stays valid
    assert x[1, 1].item() == 4.25 and x.tolist() == t.tolist()
    assert (x.numpy() == t.numpy()).all()
    assert x.cpu().equal(t) and x.to("cpu").equal(t) and x.to("cpu", torch.float64).dtype == torch.float64
    assert x.to(torch.float64).device == x.device  # a dtype change stays on the worker
    assert int(x[0, 0].floor()) == 1 and float(x[0, 0]) == 1.5 and bool(x[1, 0] > 2)
    assert f"{x.sum():.2f}" == "6.75"


def test_the_send_snapshot_is_taken_at_send_time(bob):
    t = torch.zeros(3)
    x = t.send(bob)
    y = x + torch.ones(3)  # a local operand also travels as it was at call time
    t.fill_(9)
    assert x.get().equal(torch.zeros(3)) and y.get().equal(torch.ones(3))


def test_send_keeps_requires_grad_and_strides(bob):
    t = torch.randn(3, 4).t()
    x = t.send(bob)
    assert x.stride() == t.stride() and x.get().stride() == t.stride()
    p = torch.ones(2, requires_grad=True).send(bob)
    assert p.requires_grad and p.get().equal(torch.ones(2))


def test_in_place_returns_the_same_object_and_views_alias(bob):
    x = torch.zeros(3, 4).send(bob)
    assert x.add_(1) is x and x.mul_(2) is x
    v = x[0]
    v.add_(1)
    x[1] = 7.
    x[2, :2] = torch.tensor([5., 6.])
    x.T[3].fill_(-1)
    expected = torch.tensor([[3., 3, 3, -1], [7, 7, 7, -1], [5, 6, 2, -1]])
    assert x.get().equal(expected) and v.get().equal(expected[0])
    x += 1
    assert x.get().equal(expected + 1)


def test_output_kinds(bob):
    x = torch.tensor([[3., 1.], [2., 5.]]).send(bob)
    res = torch.max(x, 1)
    assert type(res) is torch.return_types.max and isinstance(res.values, tr.RemoteTensor)
    assert res.values.get().tolist() == [3., 5.] and res.indices.get().tolist() == [0, 1]
    parts = torch.split(torch.arange(7).send(bob), 3)
    assert isinstance(parts, tuple) and [p.get().tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert isinstance(x.sum().item(), float) and isinstance((x > 2).any().item(), bool)
    assert x.shape == torch.Size([2, 2]) and x.size(1) == 2
    assert torch.equal(x, x) is True
    assert x.__setitem__(0, 1.) is None


def test_mixing_workers_names_both(server, fresh_server):
    a = tr.connect(server.url)
    b = tr.connect(fresh_server.url)
    with pytest.raises(RuntimeError, match="'bob'.*'fresh'"):
        torch.ones(2).send(a) + torch.ones(2).send(b)
    a.close(), b.close()


def test_writing_into_a_local_tensor_is_refused(bob):
    local = torch.zeros(2)
    with pytest.raises(RuntimeError, match="local tensor"):
        local.add_(torch.ones(2).send(bob))
    with pytest.raises(RuntimeError, match="local tensor"):
        torch.add(torch.ones(2).send(bob), 1, out=local)
    assert local.equal(torch.zeros(2))


def test_pickle_round_trips_onto_the_worker_and_deepcopy_copies_there(bob):
    x = torch.ones(2).send(bob)
    back = pickle.loads(pickle.dumps(x))  # as a CUDA tensor: its bytes with its device
    assert isinstance(back, tr.RemoteTensor) and back.device == x.device and back.id != x.id
    assert torch.equal(back.get(), x.get())
    y = copy.deepcopy(x)
    assert isinstance(y, tr.RemoteTensor) and y is not x and y.id != x.id
    y.add_(1)
    assert x.get().equal(torch.ones(2)) and y.get().equal(torch.full((2,), 2.))


def test_library_modules_run_on_pointers(bob):
    """torch.nn building blocks, written by no one here, run unchanged on remote inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.0), nn.Linear(16, 4))
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), nn.ReLU(), nn.MaxPool2d(2))
    x, seq, img = torch.randn(5, 8), torch.randn(2, 6, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x.send(bob)).get(), net(x), rtol=1e-6, atol=1e-6)
        mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
        out, w = attn(seq.send(bob), seq.send(bob), seq.send(bob), attn_mask=mask)
        lout, lw = attn(seq, seq, seq, attn_mask=mask)
        torch.testing.assert_close(out.get(), lout, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.get(), lw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(conv(img.send(bob)).get(), conv(img), rtol=1e-5, atol=1e-6)
    r = x.send(bob)
    loss = F.cross_entropy(net(r), torch.tensor([0, 1, 2, 3, 0]))
    assert loss.item() == pytest.approx(F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3, 0])).item(), rel=1e-6)


def test_data_dependent_shapes_synchronise(bob):
    x = torch.tensor([0., 3., 0., -1.]).send(bob)
    nz = x.nonzero()
    assert nz.shape == (2, 1) and nz.get().flatten().tolist() == [1, 3]
    assert x[x != 0].shape == (2,)
    assert torch.unique(torch.tensor([3, 1, 3]).send(bob)).get().tolist() == [1, 3]


def test_random_ops_use_the_worker_rng(bob):
    x = torch.empty(4).send(bob)
    bob.manual_seed(7)
    a = torch.rand_like(x).get()
    bob.manual_seed(7)
    b = torch.zeros(4).send(bob).uniform_().get()
    bob.manual_seed(7)
    c = torch.normal(torch.zeros(4).send(bob), 1.0).get()
    torch.manual_seed(7)
    assert a.equal(torch.rand(4)) and a.equal(b)
    torch.manual_seed(7)
    assert c.equal(torch.normal(torch.zeros(4), 1.0))


def test_works_inside_a_running_event_loop(server):
    """As in Jupyter: an asyncio loop already runs on the caller's thread."""
    import asyncio

    async def notebook_cell():
        with tr.connect(server.url) as w:
            x = torch.tensor([1., 2, 3]).send(w)
            return torch.add(x, x).relu().sum().item(), w.search("#nothing")

    assert asyncio.run(notebook_cell()) == (12.0, [])
