"""`tr.compile`: the forward captured once per signature, compiled on the worker, run as one op;
remote results equal local eager and local `torch.compile`; what cannot be captured runs eagerly
with a warning; graphs are data the worker checks, shared between clients by content."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchremote as tr
from conftest import tiny_gpt2
from test_module import TinyTransformer
from test_pipelining import Spy
from torchremote.wire.graphs import BUILD_GRAPH, RUN_GRAPH, checked_options, content_key


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _train(model, x, y, steps, lr=0.05, loss_fn=F.cross_entropy):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_an_mlp_trains_like_local_eager_and_local_compile_in_one_round_trip_a_step(bob, monkeypatch):
    local = _mlp()
    compiled_local = torch.compile(copy.deepcopy(local))
    remote = tr.compile(tr.send(copy.deepcopy(local), bob))  # inductor, on the worker
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    eager = _train(local, x, y, 20)
    with_compile = _train(compiled_local, x, y, 20)
    rx, ry = x.send(bob), y.send(bob)
    got = _train(remote, rx, ry, 2)
    spy = Spy(bob, monkeypatch)
    calls = []
    original = bob._call
    monkeypatch.setattr(bob, "_call", lambda op, *a, **k: calls.append(op) or original(op, *a, **k))
    got += _train(remote, rx, ry, 18)
    torch.testing.assert_close(got, with_compile, rtol=1e-5, atol=0)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=0)
    assert spy.round_trips == 18  # loss.item() only
    assert calls.count(RUN_GRAPH) == 18 and BUILD_GRAPH not in calls and remote.captures == 1
    for p, q in zip(remote.module.parameters(), local.parameters()):
        torch.testing.assert_close(p.get(), q.detach(), rtol=1e-4, atol=1e-5)


def test_a_transformer_with_adamw_equals_local(bob):
    torch.manual_seed(0)
    local = TinyTransformer()
    remote = tr.compile(tr.send(copy.deepcopy(local), bob))
    tokens, targets = torch.randint(0, 20, (4, 8)), torch.randint(0, 20, (4,))
    losses = {}
    for name, model, a, b in (("local", local, tokens, targets),
                              ("remote", remote, tokens.send(bob), targets.send(bob))):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(a), b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["remote"], losses["local"], rtol=1e-4, atol=0)


def test_hugging_face_gpt2_trains_with_labels_like_local(bob):
    local = tiny_gpt2()
    remote = tr.compile(tr.send(copy.deepcopy(local), bob), backend="aot_eager")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model, x in (("local", local, ids), ("remote", remote, ids.send(bob))):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["remote"], losses["local"], rtol=1e-4, atol=0)
    assert remote.captures == 1


def test_a_new_signature_captures_again_and_eval_mode_is_one(bob):
    remote = tr.compile(tr.send(_mlp(), bob), backend="eager")
    remote(torch.randn(4, 8).send(bob))
    remote(torch.randn(4, 8).send(bob))
    assert remote.captures == 1
    remote(torch.randn(6, 8).send(bob))  # another batch size
    remote.eval()
    with torch.no_grad():
        remote(torch.randn(6, 8).send(bob))
    assert remote.captures == 3


def test_batchnorm_buffers_and_dropout_update_on_the_worker(bob):
    torch.manual_seed(0)
    local = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    remote = tr.compile(tr.send(copy.deepcopy(local), bob), backend="aot_eager")
    x, y = torch.randn(10, 6), torch.randint(0, 2, (10,))
    torch.testing.assert_close(_train(remote, x.send(bob), y.send(bob), 4), _train(local, x, y, 4), rtol=1e-4, atol=0)
    bn, remote_bn = local[1], remote.module[1]
    torch.testing.assert_close(remote_bn.running_mean.get(), bn.running_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(remote_bn.running_var.get(), bn.running_var, rtol=1e-4, atol=1e-6)
    assert remote_bn.num_batches_tracked.get().item() == 4

    dropping = tr.compile(tr.send(torch.nn.Sequential(torch.nn.Dropout(0.5)), bob), backend="aot_eager")
    ones = torch.ones(1000).send(bob)
    torch.manual_seed(7)  # seeds the worker too
    first = dropping(ones).get()
    torch.manual_seed(7)
    assert torch.equal(dropping(ones).get(), first)  # the worker's RNG, as eager dropout uses it
    assert 300 < int((first == 0).sum()) < 700 and set(first.unique().tolist()) == {0.0, 2.0}


def test_what_cannot_be_captured_runs_eagerly_with_one_warning(bob):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            return h * 2 if h.sum() > 0 else h - 1  # data-dependent control flow

    torch.manual_seed(0)
    local = Branchy()
    remote = tr.compile(tr.send(copy.deepcopy(local), bob))
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="tr.compile: the forward could not be captured.*runs eagerly"):
        got = remote(x.send(bob))
    torch.testing.assert_close(got.get(), local(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per signature
        remote(x.send(bob))
    assert remote.captures == 0


def _graph(name: str) -> tuple[str, dict, list, dict]:
    data = {"placeholders": 1, "nodes": [[name, [{"v": 0}], {}]], "output": [{"v": 1}]}
    options = checked_options({})
    return content_key(data, [], options), data, [], options


@pytest.mark.parametrize("name", ["torch.Tensor.data_ptr", "builtins.eval", "aten.not_an_op.default",
                                  "os.system"])
def test_a_graph_with_a_node_outside_the_allow_list_is_refused(bob, name):
    key, data, constants, options = _graph(name)
    x = torch.ones(3).send(bob)
    bob._call(BUILD_GRAPH, (key, data, constants, options), {})
    op_id = bob._call(RUN_GRAPH, (key, x._ref), {})
    with pytest.raises(tr.WorkerPermissionError, match="not an ATen op|not in this worker's allow-list"):
        bob.sync()
    assert op_id and (x + 1).get().tolist() == [2., 2., 2.]  # the worker serves on
    key, data, constants, options = _graph("aten.relu.default")
    bob._call(BUILD_GRAPH, (key + "0", data, constants, options), {})  # a key that is not its content's
    bob._call(RUN_GRAPH, (key + "0", x._ref), {})
    with pytest.raises(tr.WorkerPermissionError, match="does not match its content"):
        bob.sync()


def test_a_second_client_reuses_the_compiled_graph(server):
    first, second = tr.connect(server.url), tr.connect(server.url)
    try:
        builds = server.graphs.builds
        for w in (first, second):
            torch.manual_seed(0)
            model = tr.compile(tr.send(torch.nn.Linear(5, 2), w), backend="aot_eager")
            model(torch.ones(3, 5).send(w)).sum().item()
        assert server.graphs.builds == builds + 1
    finally:
        first.close()
        second.close()


@pytest.fixture
def private_data():
    """A client of a worker that published private data: the client and a pointer to that data."""
    server = tr.start_worker(id="owner", token="client-token", owner_token="owner-token")
    server.publish(torch.randn(4, 3), tags=["#private"], private=True)
    client = tr.connect(server.url, token="client-token")
    (x,) = client.search("#private")
    yield client, x
    client.close()
    server.stop()


def test_private_data_stays_private_through_a_compiled_call(private_data):
    client, x = private_data
    model = tr.compile(tr.send(torch.nn.Linear(3, 1), client), backend="aot_eager")
    out = model(x)
    with pytest.raises(tr.ApprovalRequired):
        out.get()
    with pytest.raises(tr.ApprovalRequired):
        out.sum().item()


def test_unknown_options_are_refused_at_the_call(bob):
    with pytest.raises(TypeError, match="unexpected options"):
        tr.compile(torch.nn.Linear(2, 2), options={"cpp.cxx": "evil"})
    with pytest.raises(tr.WorkerPermissionError, match="backend"):
        tr.compile(torch.nn.Linear(2, 2), backend="my_backend")


# --- tr.compile(optimizer): the step as one op on the worker -----------------------------------------

def test_a_compiled_optimizer_steps_like_local_with_a_scheduler_in_one_op(bob, monkeypatch):
    torch.manual_seed(0)
    local = TinyTransformer()
    remote = tr.send(copy.deepcopy(local), bob)
    tokens, targets = torch.randint(0, 20, (4, 8)), torch.randint(0, 20, (4,))
    losses, opts = {}, {}
    for name, model, a, b, wrap in (("local", local, tokens, targets, lambda o: o),
                                    ("remote", remote, tokens.send(bob), targets.send(bob), tr.compile)):
        opt = opts[name] = wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        losses[name] = []
        for step in range(6):
            if step == 5 and name == "remote":
                calls = []
                original = bob._call
                monkeypatch.setattr(bob, "_call", lambda op, *a, **k: calls.append(op) or original(op, *a, **k))
            opt.zero_grad()
            loss = F.cross_entropy(model(a), b)
            loss.backward()
            opt.step()
            sched.step()
            losses[name].append(loss.item())
    # torch's own AdamW: its fused kernel on the worker, the per-parameter loop locally
    torch.testing.assert_close(losses["remote"], losses["local"], rtol=1e-5, atol=0)
    assert calls.count("torchremote.optimizer_step") == 1 and not any("_foreach" in c for c in calls)
    opts["remote"].zero_grad()
    assert all(p.grad is None for p in remote.parameters())
    remote_state, local_state = opts["remote"].state_dict(), opts["local"].state_dict()
    assert remote_state["param_groups"] == local_state["param_groups"]  # lr 1e-2 halved twice
    for i, state in local_state["state"].items():
        for k, v in state.items():
            assert isinstance(remote_state["state"][i][k], tr.RemoteTensor)
            torch.testing.assert_close(remote_state["state"][i][k].get(), v, rtol=1e-4, atol=1e-6)
    # (parameters are not compared element by element: attention's key bias gets a gradient of pure
    # rounding noise, which Adam scales up to lr-sized steps whose sign the two kernels round apart)


def test_a_compiled_optimizer_refuses_what_it_cannot_do(bob, server):
    model = tr.send(torch.nn.Linear(3, 2), bob)
    with pytest.raises(TypeError, match="torch's own optimizers"):
        tr.compile(type("MyOpt", (torch.optim.SGD,), {})(model.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match="is a tensor"):
        tr.compile(torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3).send(bob)).sum().backward()
    opt.step()
    with pytest.raises(NotImplementedError, match="before its first step"):
        tr.compile(opt)
    other = tr.connect(server.url)
    try:
        mixed = [torch.nn.Parameter(torch.ones(2)).to(bob.device), torch.nn.Parameter(torch.ones(2)).to(other.device)]
        with pytest.raises(ValueError, match="one worker"):
            tr.compile(torch.optim.SGD(mixed, lr=0.1))
    finally:
        other.close()
    compiled = tr.compile(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match="closure"):
        compiled.step(lambda: None)
    compiled.add_param_group({"params": [torch.nn.Parameter(torch.ones(2)).to(bob.device)]})
    with pytest.raises(NotImplementedError, match="parameter groups changed"):
        compiled.step()


def test_a_compiled_optimizer_keeps_private_data_private(private_data):
    client, x = private_data
    model = tr.send(torch.nn.Linear(3, 1), client)
    opt = tr.compile(torch.optim.Adam(model.parameters(), lr=0.1))
    model(x).sum().backward()
    opt.step()
    with pytest.raises(tr.ApprovalRequired):
        model.weight.get()
    with pytest.raises(tr.ApprovalRequired):
        opt.state_dict()["state"][0]["exp_avg"].get()


def test_a_compiled_optimizers_state_counts_against_the_memory_budget():
    server = tr.start_worker(id="budgeted", max_memory="64MiB")
    client = tr.connect(server.url)
    try:
        model = tr.send(torch.nn.Linear(1024, 1024), client)  # 4 MiB of parameters
        opt = tr.compile(torch.optim.Adam(model.parameters(), lr=1e-3))
        model(torch.ones(2, 1024).send(client)).sum().backward()
        before = torch.remote.memory_allocated(client.device)
        opt.step()
        grown = torch.remote.memory_allocated(client.device) - before
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        assert 2 * params <= grown <= 2 * params + 4096  # exp_avg and exp_avg_sq (and the steps)
    finally:
        client.close()
        server.stop()
