"""Existing model code, unchanged, on a worker process: the same losses, weights and outputs as local."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr
from conftest import connected_worker


@pytest.fixture(scope="module")
def proc_worker():
    with connected_worker("--id", "trainer") as w:
        yield w


# --- models written the way people write them ------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = cell(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 16)
        self.pos = nn.Embedding(8, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 20)
        self.head.weight = self.tok.weight  # tied weights

    def forward(self, tokens):
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device)                       # made where the data is
        mask = torch.triu(torch.ones(T, T, device=tokens.device, dtype=torch.bool), 1)
        h = self.tok(tokens) + self.pos(positions)[None]
        return self.head(self.block(h, src_mask=mask, is_causal=True))[:, -1]


def train(model, inputs, targets, make_opt, steps=4, clip=None):
    """An ordinary training loop: nothing in it knows about workers."""
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        out = model(inputs)
    return losses, out, opt


OPTIMIZERS = {
    "sgd-momentum-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-1),
}
CASES = [
    ("mlp", MLP, lambda g: torch.randn(16, 12, generator=g), "sgd-momentum-nesterov-wd", None),
    ("mlp", MLP, lambda g: torch.randn(16, 12, generator=g), "adamw", 1.0),
    ("cnn", CNN, lambda g: torch.randn(8, 3, 8, 8, generator=g), "sgd-momentum-nesterov-wd", None),
    ("cnn", CNN, lambda g: torch.randn(8, 3, 8, 8, generator=g), "rmsprop", None),
    ("lstm", Recurrent, lambda g: torch.randint(0, 20, (8, 6), generator=g), "adam", None),
    ("gru", lambda: Recurrent(nn.GRU), lambda g: torch.randint(0, 20, (8, 6), generator=g), "adagrad", 0.5),
    ("transformer", TinyTransformer, lambda g: torch.randint(0, 20, (4, 8), generator=g), "adam", 1.0),
]


@pytest.mark.parametrize("name,make_model,make_input,opt_name,clip", CASES,
                         ids=[f"{c[0]}-{c[3]}{'-clip' if c[4] else ''}" for c in CASES])
def test_training_remote_equals_local(proc_worker, name, make_model, make_input, opt_name, clip):
    g = torch.Generator().manual_seed(1)
    x, y = make_input(g), torch.randint(0, 4, (make_input(g).shape[0],), generator=g)
    torch.manual_seed(0)
    local = make_model()
    torch.manual_seed(0)
    remote = tr.send(make_model(), proc_worker)
    params = list(remote.parameters())
    assert all(isinstance(p, tr.RemoteTensor) and isinstance(p, nn.Parameter) for p in params)
    l_losses, l_out, l_opt = train(local, x, y, OPTIMIZERS[opt_name], clip=clip)
    r_losses, r_out, r_opt = train(remote, x.send(proc_worker), y.send(proc_worker), OPTIMIZERS[opt_name], clip=clip)
    assert list(remote.parameters())[0] is params[0]  # the same Parameter objects throughout
    torch.testing.assert_close(torch.tensor(r_losses), torch.tensor(l_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_out.get(), l_out, rtol=1e-4, atol=1e-5)
    tr.get(remote)
    for (n, rp), lp in zip(remote.named_parameters(), local.parameters()):
        assert type(rp) is nn.Parameter and rp.device.type == "cpu", n
        torch.testing.assert_close(rp.data, lp.data, rtol=1e-4, atol=1e-5, msg=n)
    for rb, lb in zip(remote.buffers(), local.buffers()):
        torch.testing.assert_close(rb, lb, rtol=1e-4, atol=1e-5)  # BatchNorm running stats too


def test_send_and_get_in_place_tied_weights_buffers_and_state_dicts(proc_worker):
    model = TinyTransformer()
    cnn = CNN()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert tr.send(model, proc_worker) is model
    assert model.head.weight is model.tok.weight  # still tied
    assert isinstance(model.tok.weight, tr.RemoteTensor)
    remote_sd = model.state_dict()
    assert all(isinstance(v, tr.RemoteTensor) for v in remote_sd.values())
    fresh = TinyTransformer()
    fresh.load_state_dict(remote_sd)  # remote -> local: fetched
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reference[k]), k
    tr.send(cnn, proc_worker)
    local_cnn = CNN()
    cnn.load_state_dict(local_cnn.state_dict())  # local -> remote: sent
    assert torch.equal(cnn.features[1].running_var.get(), local_cnn.features[1].running_var)
    tr.get(model), tr.get(cnn)
    assert not any(isinstance(t, tr.RemoteTensor) for t in [*model.parameters(), *cnn.buffers()])
    assert model.head.weight is model.tok.weight


def test_a_model_travels_in_one_message_each_way(bob, monkeypatch):
    from test_pipelining import Spy
    spy = Spy(bob, monkeypatch)
    with bob._lock:  # the writer thread cannot send meanwhile (releases); this thread can
        model = tr.send(MLP(), bob)
        assert spy.frames == 1 and len(list(model.parameters())) > 1
    expected = [p.get() for p in model.parameters()]
    with bob._lock:
        before = spy.frames
        tr.get(model)
        assert spy.frames - before == 1  # every parameter fetched in one round trip
    for p, e in zip(model.parameters(), expected):
        assert not isinstance(p, tr.RemoteTensor) and torch.equal(p.detach(), e)


def test_get_frees_what_the_model_held(fresh_server):
    w = tr.connect(fresh_server.url)
    model = tr.send(MLP(), w)
    w.sync()
    held = [r for r in fresh_server.objects() if r.owner == w.client_id]
    assert len(held) == len(list(model.parameters()))
    tr.get(model)
    gc.collect()
    w.sync()
    assert [r for r in fresh_server.objects() if r.owner == w.client_id] == []
    w.close()


def test_a_model_built_on_the_worker_equals_a_seeded_local_build(proc_worker):
    proc_worker.manual_seed(0)
    with tr.on(proc_worker):
        built = MLP()
    assert all(isinstance(p, tr.RemoteTensor) for p in built.parameters())
    torch.manual_seed(0)
    local = MLP()
    for rp, lp in zip(built.parameters(), local.parameters()):
        assert torch.equal(rp.get(), lp)
    x = torch.randn(3, 12)
    torch.testing.assert_close(built(x.send(proc_worker)).get(), local(x), rtol=0, atol=0)


def test_autograd_features(proc_worker):
    def run(t):
        x = t(torch.tensor([1., 2., 3.])).requires_grad_()
        y = (x ** 3).sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)       # 3x^2, with a graph
        (ggx,) = torch.autograd.grad(gx.sum(), x, retain_graph=True)  # 6x
        z = (x * 2).sum()
        z.backward(retain_graph=True)
        z.backward()                                                  # accumulates: 4
        with torch.no_grad():
            nograd = x * 2
        with torch.enable_grad():
            withgrad = x * 2
        with torch.inference_mode():
            inference = x * 2
        d = x.detach()
        return [gx, ggx, x.grad, nograd.requires_grad, withgrad.requires_grad, inference.requires_grad,
                d.requires_grad, x.is_leaf, nograd.is_leaf]

    local = run(lambda t: t)
    remote = run(lambda t: t.send(proc_worker))
    for l, r in zip(local, remote):
        if isinstance(l, torch.Tensor):
            assert torch.equal(r.get(), l.detach())
        else:
            assert r == l


def test_send_to_a_device_of_the_worker(proc_worker):
    model = tr.send(MLP(), proc_worker, device="cpu")
    assert model(torch.randn(2, 12).send(proc_worker)).shape == (2, 4)
    with pytest.raises((RuntimeError, AssertionError)):  # this worker has no such device
        torch.ones(2).send(proc_worker, device="cuda")
        proc_worker.sync()
    assert (torch.ones(2).send(proc_worker) + 1).sum().item() == 4.0


def test_factories_inside_on_and_with_a_remote_device(proc_worker):
    x = torch.ones(2).send(proc_worker)
    with tr.on(proc_worker):
        made = [torch.zeros(2, 3), torch.arange(4), torch.tensor([1.5, 2.5]), torch.randn(3),
                torch.as_tensor([[1, 2]]), torch.eye(2)]
    assert all(isinstance(t, tr.RemoteTensor) for t in made)
    assert made[2].get().tolist() == [1.5, 2.5] and made[4].get().tolist() == [[1, 2]]
    outside = [torch.zeros(3, device=x.device), torch.arange(3, device=x.device), x.new_zeros(4),
               torch.full((2,), 7.0, device=x.device), torch.ones(2).to(x.device),
               torch.tensor([[1, 2]], device=x.device)]
    assert all(isinstance(t, tr.RemoteTensor) and t.device == x.device for t in outside)
    assert outside[1].get().tolist() == [0, 1, 2] and outside[3].sum().item() == 14.0
    assert outside[5].get().tolist() == [[1, 2]]
    assert torch.zeros(2).device.type == "cpu"  # outside the block, factories are local again


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
], ids=["sgd-foreach", "adam-foreach"])
def test_foreach_optimizers_clip_value_and_optimizer_state(proc_worker, make_opt):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
    results = {}
    for where in ("local", "remote"):
        torch.manual_seed(0)
        model = MLP()
        xs, ys = (x, y)
        if where == "remote":
            tr.send(model, proc_worker)
            xs, ys = x.send(proc_worker), y.send(proc_worker)
        opt = make_opt(model.parameters())
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
            opt.step()
            losses.append(loss.item())
        state = opt.state_dict()
        fresh = make_opt(model.parameters())
        fresh.load_state_dict(state)  # the state (remote tensors, for the remote model) loads back
        results[where] = (losses, [v for s in state["state"].values() for v in s.values()
                                   if isinstance(v, torch.Tensor) and v.dim() > 0])
    torch.testing.assert_close(torch.tensor(results["remote"][0]), torch.tensor(results["local"][0]),
                               rtol=1e-5, atol=1e-6)
    for r, l in zip(results["remote"][1], results["local"][1]):
        assert isinstance(r, tr.RemoteTensor)
        torch.testing.assert_close(r.get(), l, rtol=1e-5, atol=1e-6)


def test_a_warm_training_step_makes_one_round_trip(proc_worker, monkeypatch):
    model = tr.send(TinyTransformer(), proc_worker)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 20, (4, 8)).send(proc_worker)
    target = torch.randint(0, 20, (4,)).send(proc_worker)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tokens), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    step()  # the first step learns the shapes of things, and where gradients are None
    asked = []
    for name in ("_request", "_call_sync"):
        original = getattr(proc_worker, name)
        monkeypatch.setattr(proc_worker, name, lambda *a, _o=original, _n=name, **k: (asked.append(a[0]), _o(*a, **k))[1])
    for _ in range(3):
        asked.clear()
        step()
        assert asked == ["torch.Tensor.item"], asked  # gradients never travel; only the loss value does
