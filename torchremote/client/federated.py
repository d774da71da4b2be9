"""Helpers for the federated pattern: train copies of a model where the data is, average the results."""
from __future__ import annotations

from typing import Sequence

import torch


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The (weighted) mean of models' state dicts, key by key: federated averaging's merge step.

    Floating-point entries are averaged; others (BatchNorm's `num_batches_tracked`) are taken from
    the first. Fetch remote models first (`torchremote.get(model)`): the mean is computed here.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts() needs at least one state dict")
    weights = [1.0] * len(state_dicts) if weights is None else list(weights)
    if len(weights) != len(state_dicts):
        raise ValueError(f"{len(weights)} weights for {len(state_dicts)} state dicts")
    total = float(sum(weights))
    averaged = {}
    for key, first in state_dicts[0].items():
        if first.is_floating_point():
            averaged[key] = sum(w / total * sd[key] for w, sd in zip(weights, state_dicts))
        else:
            averaged[key] = first.clone()
    return averaged
