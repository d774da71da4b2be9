"""What the owner published stays as he published it: no client changes it for anyone else.

Every attack runs from a second client, on open and on private data; a third client and the owner
must then see the original bytes. The worker enforces it itself: the attacks that bypass the client's
own check (raw commands, as a modified client would send) are refused too.
"""
from __future__ import annotations

import pytest
import torch

import torchremote as tr
from torchremote.client.dispatch import queue

OPEN = torch.tensor([1.0, 2.0, 3.0, 4.0])
PRIVATE = torch.tensor([10.0, 20.0, 30.0, 40.0])


@pytest.fixture
def owner():
    server = tr.start_worker(id="bob", token="client-token", owner_token="owner-token")
    server.publish(OPEN.clone(), tags=["#open"])
    server.publish(PRIVATE.clone(), tags=["#private"], private=True)
    server.publish(torch.zeros(3), tags=["#shared-model"], writable=True)
    yield server
    server.stop()


@pytest.fixture
def clients(owner):
    attacker = tr.connect(owner.url, token="client-token", name="mallory")
    other = tr.connect(owner.url, token="client-token", name="carol")
    yield attacker, other
    attacker.close()
    other.close()


def _published(owner: tr.WorkerServer, tag: str) -> torch.Tensor:
    (oid,) = [row.id for row in owner.objects() if tag in row.tags]
    return owner.store.published(tr.wire.messages.PublishedRef(int(oid[1:]))).tensor


def _unchanged(owner, other, tag: str, original: torch.Tensor) -> None:
    assert torch.equal(_published(owner, tag), original)
    (x,) = other.search(tag)
    assert not x.requires_grad
    if tag == "#open":  # (private data the other client may not read: the owner's copy says it all)
        assert torch.equal(x.get(), original)


ATTACKS = {
    "add_": lambda x, w: x.add_(100),
    "zero_": lambda x, w: x.zero_(),
    "copy_": lambda x, w: x.copy_(torch.ones(4)),
    "x[0] = -1": lambda x, w: x.__setitem__(0, -1.0),
    "out=": lambda x, w: torch.add(x, 1, out=x),
    "resize_": lambda x, w: x.resize_(2),
    "through a view": lambda x, w: x[1:].mul_(0),
    "through a reshaped view": lambda x, w: x.view(2, 2)[0].fill_(7),
    "in place functional": lambda x, w: torch.nn.functional.relu(x, inplace=True),
    "clamp_": lambda x, w: x.clamp_(max=0),
    # what a modified client could send: no client-side check on the way
    "raw add_": lambda x, w: queue(torch.Tensor.add_, (x, 1), {}),
    "raw aten copy_": lambda x, w: queue(torch.ops.aten.copy_.default, (x, torch.zeros(4).send(w)), {}),
    "raw set_ then write": lambda x, w: queue(torch.Tensor.add_, (_alias(x, w), 1), {}),
}


def _alias(x, w):
    """A client tensor made to alias the published memory (set_ onto it), then written through."""
    mine = torch.empty(0).send(w)
    queue(torch.Tensor.set_, (mine, x), {})
    return mine


@pytest.mark.parametrize("tag, original", [("#open", OPEN), ("#private", PRIVATE)])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_write_to_published_data_is_refused(owner, clients, tag, original, attack):
    attacker, other = clients
    (x,) = attacker.search(tag)
    with pytest.raises(PermissionError) as info:
        ATTACKS[attack](x, attacker)
        attacker.sync()
    assert tag in str(info.value) and "read-only" in str(info.value) and ".clone()" in str(info.value)
    _unchanged(owner, other, tag, original)
    mine = x.clone()
    mine.add_(1)  # a copy of one's own takes any change
    if tag == "#open":
        assert mine.get().tolist() == (original + 1).tolist()


@pytest.mark.parametrize("tag, original", [("#open", OPEN), ("#private", PRIVATE)])
def test_data_assignment_replaces_only_the_attackers_pointer(owner, clients, tag, original):
    attacker, other = clients
    (x,) = attacker.search(tag)
    x.data = torch.zeros(4).send(attacker)
    assert x.get().tolist() == [0.0] * 4
    queue(torch.Tensor.data.__set__, (attacker.search(tag)[0], torch.zeros(4).send(attacker)), {})
    attacker.sync()  # the raw setter acts on the attacker's own alias of the published tensor
    _unchanged(owner, other, tag, original)


@pytest.mark.parametrize("tag, original", [("#open", OPEN), ("#private", PRIVATE)])
def test_requires_grad_gives_a_leaf_of_ones_own_and_an_optimizer_step_is_refused(owner, clients, tag, original):
    attacker, other = clients
    (x,) = attacker.search(tag)
    x.requires_grad_()
    (x * 2).sum().backward()
    assert x.grad is not None
    optimizer = torch.optim.SGD([x], lr=1.0)
    with pytest.raises(PermissionError, match="read-only"):
        optimizer.step()
        attacker.sync()
    queue(torch.Tensor.requires_grad_, (attacker.search(tag)[0], True), {})  # raw, on the published ref
    attacker.sync()
    _unchanged(owner, other, tag, original)


def test_a_writable_publish_takes_updates_for_everyone(owner, clients):
    attacker, other = clients
    (w,) = attacker.search("#shared-model")
    assert w._published.writable
    w.add_(1)
    w.requires_grad_()
    (w * 3).sum().backward()
    torch.optim.SGD([w], lr=0.5).step()
    attacker.sync()
    (seen,) = other.search("#shared-model")
    assert seen.get().tolist() == [-0.5] * 3
    assert torch.equal(_published(owner, "#shared-model"), torch.full((3,), -0.5))


def test_the_owner_may_change_his_own_data(owner):
    with tr.connect(owner.url, token="owner-token", name="bob") as me:
        (x,) = me.search("#open")
        queue(torch.Tensor.add_, (x, 1), {})
        me.sync()
    assert torch.equal(_published(owner, "#open"), OPEN + 1)


def test_dropping_pointers_never_frees_published_data(owner, clients):
    attacker, other = clients
    for _ in range(3):
        (x,) = attacker.search("#open")
        del x
    attacker.sync()
    assert other.search("#open")[0].get().tolist() == OPEN.tolist()
