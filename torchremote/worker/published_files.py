"""Data a worker publishes from safetensors files, so that it outlives the worker's process.

Each tensor in a file is published under its name: the name is its first tag, so
`worker.search("weights")` finds it. A file's own metadata may add tags and a description, and
make its tensors private:

    safetensors.torch.save_file(tensors, "cohort.safetensors",
                                metadata={"tags": "#cohort,#2024", "description": "...", "private": "true"})

Files are read with the `safetensors` package, which never unpickles anything. A file is read whole
before any of it is published, so a missing or malformed file publishes nothing and the error
names it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SUFFIX = ".safetensors"


class PublishFileError(ValueError):
    """A file that cannot be published: missing, unreadable or not safetensors."""


@dataclass
class TensorFile:
    path: str
    tensors: dict[str, torch.Tensor]
    tags: tuple[str, ...]      # from the file's metadata
    description: str
    private: bool = False      # the metadata says "private": "true": never fetched, only computed on


def read(path: str) -> TensorFile:
    """Every tensor in a safetensors file, with the tags and description its metadata gives."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise PublishFileError(f"cannot publish {path}: no such file")
    try:
        with safe_open(path, "pt") as f:  # one pass: the metadata and every tensor
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PublishFileError(f"cannot publish {path}: not a readable safetensors file ({e})") from None
    tags = tuple(t.strip() for t in metadata.get("tags", "").split(",") if t.strip())
    private = metadata.get("private", "").strip().lower() in ("1", "true", "yes")
    return TensorFile(path, tensors, tags, metadata.get("description", ""), private)


def in_directory(directory: str) -> list[str]:
    """The safetensors files in `directory`, in name order."""
    if not os.path.isdir(directory):
        raise PublishFileError(f"cannot publish from {directory}: no such directory")
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(SUFFIX))
