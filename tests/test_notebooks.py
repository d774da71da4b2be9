"""The seed's own form: Bob's notebook serves while the model owner's notebook computes on his data.

Both run in real IPython kernels (which run an asyncio loop of their own) through nbclient."""
from __future__ import annotations

import socket

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = ROOT / "examples" / "notebooks"


def outputs(cell) -> str:
    return "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)


def test_bob_serves_while_the_model_owner_computes(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("BOB_PORT", str(port))
    monkeypatch.setenv("BOB_URL", f"ws://127.0.0.1:{port}")
    bob_nb = nbformat.read(NOTEBOOKS / "Bob.ipynb", as_version=4)
    model_nb = nbformat.read(NOTEBOOKS / "Model.ipynb", as_version=4)
    bob = NotebookClient(bob_nb, timeout=120, kernel_name="python3")
    with bob.setup_kernel():
        code = [(i, c) for i, c in enumerate(bob_nb.cells) if c.cell_type == "code"]
        for i, cell in code[:-1]:
            bob.execute_cell(cell, i)
        assert f"ws://127.0.0.1:{port}" in outputs(code[1][1])

        NotebookClient(model_nb, timeout=120, kernel_name="python3").execute()  # Bob's kernel serves
        cells = [c for c in model_nb.cells if c.cell_type == "code"]
        assert "worker 'bob'" not in outputs(cells[0]) and "Worker(id='bob'" in outputs(cells[0])
        assert "RemoteTensor(id=p2, worker='bob', shape=(5,), dtype=torch.float32, tags=['#Y'])" in outputs(cells[1])
        assert "RemoteTensor(id=" in outputs(cells[2]) and "tensor([2., 3., 4., 5., 6.])" in outputs(cells[3])
        assert "#X" in outputs(cells[4]) and "Bob's Y" in outputs(cells[4])

        bob.execute_cell(code[-1][1], code[-1][0])  # the owner's registry, after the visit
        registry = outputs(code[-1][1])
        assert "p1" in registry and "#X" in registry
