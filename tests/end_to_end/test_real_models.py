"""Library code no one here wrote, on a worker process: Hugging Face's GPT-2, trained with its own
loss and AdamW at torch's defaults, and a greedy generation loop - equal to local runs."""
from __future__ import annotations

import copy

import pytest
import torch

import torchremote as tr
from conftest import connected_worker, tiny_gpt2

transformers = pytest.importorskip("transformers")  # installed by the test extra


@pytest.fixture(scope="module")
def proc_worker():
    with connected_worker() as w:
        yield w


def test_gpt2_trains_on_a_worker_as_locally(proc_worker):
    local = tiny_gpt2()
    remote = tr.send(copy.deepcopy(local), proc_worker)
    assert remote.lm_head.weight is remote.transformer.wte.weight  # tied weights stay tied
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model, x in (("local", local, tokens), ("remote", remote, tokens.send(proc_worker))):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["remote"], losses["local"], rtol=1e-5, atol=1e-6)
    tr.get(remote)
    for (name, p), q in zip(local.named_parameters(), remote.parameters()):
        torch.testing.assert_close(q, p.detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_greedy_generation_loop_equals_local(proc_worker):
    local = tiny_gpt2().eval()
    remote = tr.send(copy.deepcopy(local), proc_worker)
    prompt = torch.tensor([[5, 17, 42]])

    def generate(model, ids, steps=6):
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=ids).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids

    expected = generate(local, prompt)
    got = generate(remote, prompt.send(proc_worker))
    assert isinstance(got, tr.RemoteTensor)
    assert torch.equal(got.get(), expected)
