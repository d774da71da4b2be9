"""Checkpoints kept on the worker's disk: a model too big to fetch every N steps is saved where it
is, as a safetensors file in the directory its owner allows (`--checkpoint-dir`), and loaded back
from there. Nothing is pickled, and a client names a file, never a path.

Provenance goes with the file: a tensor derived from private data is written with what it derives
from (sources, lineage, backward passes, an error in its history), and comes back derived from
the same, so a save and a load never launder private-derived data into open data.
"""
from __future__ import annotations

import json
from collections import Counter
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..wire import messages as m
from ..wire.errors import WorkerPermissionError
from .provenance import Derived

SUFFIX = ".safetensors"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PROVENANCE_KEY = "torchremote.provenance"


def path_for(directory: str | None, name: str) -> Path:
    """The file a client's checkpoint name stands for, inside `directory` and nowhere else."""
    if directory is None:
        raise WorkerPermissionError(
            "this worker keeps no checkpoints on its disk: its owner starts it with --checkpoint-dir DIR "
            "(or start_worker(checkpoint_dir=...)) to allow them")
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    if not _NAME.fullmatch(stem) or ".." in stem:
        raise ValueError(f"checkpoint name {name!r}: use letters, digits, '_', '-' and '.', "
                         f"at most 128 characters (a name, not a path)")
    return Path(directory) / (stem + SUFFIX)


def save(path: Path, tensors: dict[str, torch.Tensor], derived: dict[str, Derived]) -> int:
    """Write the file (whole, then renamed into place: a crash leaves the old one); returns its bytes."""
    provenance = {key: {"sources": sorted(d.sources), "lineage": d.lineage, "steps": d.steps,
                        "error": [d.error.type, d.error.message, d.error.op] if d.error is not None else None}
                  for key, d in derived.items()}
    # safetensors wants contiguous tensors that share no memory (tied weights do): copies where needed
    users = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    plain = {key: t.detach().clone() if users[t.untyped_storage().data_ptr()] > 1 else t.detach().contiguous()
             for key, t in tensors.items()}
    partial = path.with_name(path.name + ".partial")
    save_file(plain, str(partial), metadata={_PROVENANCE_KEY: json.dumps(provenance)})
    os.replace(partial, path)
    return path.stat().st_size


def load(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Derived]]:
    """The file's tensors (on `device`), and what each derives from (none: open data)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path.name!r} on this worker")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path), device=str(device))
    derived = {}
    for key, entry in json.loads(metadata.get(_PROVENANCE_KEY, "{}")).items():
        error = m.ErrorInfo(*entry["error"]) if entry.get("error") else None
        derived[key] = Derived(frozenset(entry["sources"]), int(entry["steps"]), text=entry["lineage"], error=error)
    return tensors, derived
