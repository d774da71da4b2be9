"""The seed's own form: Bob's notebook serves while the model owner's notebook computes on his data.

Both run in real IPython kernels (which run an asyncio loop of their own) through nbclient."""
from __future__ import annotations

import socket
import threading

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
        for i, cell in code[:-3]:
            bob.execute_cell(cell, i)
        assert f"ws://127.0.0.1:{port}" in outputs(code[1][1])
        assert "console: http://127.0.0.1:" in outputs(code[1][1]) and "/login?token=" in outputs(code[1][1])

        # the model owner's notebook runs in its own kernel while Bob's answers its release request
        model = threading.Thread(target=NotebookClient(model_nb, timeout=120, kernel_name="python3").execute)
        model.start()
        for i, cell in code[-3:-1]:
            bob.execute_cell(cell, i)
        model.join(timeout=150)
        assert not model.is_alive()
        assert "mean(#salaries)" in outputs(code[-3][1]) and "for my report" in outputs(code[-3][1])
        assert "approved" in outputs(code[-2][1])
        cells = [c for c in model_nb.cells if c.cell_type == "code"]
        assert "needs the owner's approval" in outputs(cells[4]) and "pending" in outputs(cells[5])
        assert "tensor(60437.5000)" in outputs(cells[6])
        assert "worker 'bob'" not in outputs(cells[0]) and "Worker(id='bob'" in outputs(cells[0])
        assert "RemoteTensor(id=p2, worker='bob', shape=(5,), dtype=torch.float32, tags=['#Y'])" in outputs(cells[1])
        assert "RemoteTensor(id=" in outputs(cells[2]) and "tensor([2., 3., 4., 5., 6.])" in outputs(cells[3])
        assert "#X" in outputs(cells[-1]) and "Bob's Y" in outputs(cells[-1])

        bob.execute_cell(code[-1][1], code[-1][0])  # the owner's registry, after the visit
        registry = outputs(code[-1][1])
        assert "p1" in registry and "#X" in registry
