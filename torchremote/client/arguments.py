"""A call's arguments as a flat list and a spec to rebuild them: cheap for the common shapes.

Most torch calls take leaves (`x + 1`), or one level of lists of leaves (`torch.cat([a, b])`, the
`_foreach_*` ops an optimizer step makes). Those flatten without pytree, and their spec is a small
hashable tuple, cheap to use in a cache key. Anything deeper goes through pytree.
"""
from __future__ import annotations

from typing import Any

from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

FLAT = None  # the spec of a call whose arguments are all leaves, with no keyword arguments
_CONTAINERS = (list, tuple, dict)


def flatten(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """(flat leaves, spec): `FLAT`, a `Shallow` spec, or a pytree `TreeSpec`."""
    if not kwargs:
        for a in args:
            if isinstance(a, _CONTAINERS):
                break
        else:
            return list(args), FLAT
    flat: list = []
    layout: list = []
    for a in args:
        kind = type(a)
        if kind is list or kind is tuple:
            for x in a:
                if isinstance(x, _CONTAINERS):
                    return tree_flatten((args, kwargs))
            flat.extend(a)
            layout.append((kind, len(a)))
        elif isinstance(a, _CONTAINERS):
            return tree_flatten((args, kwargs))
        else:
            flat.append(a)
            layout.append(None)
    for v in kwargs.values():
        if isinstance(v, _CONTAINERS):
            return tree_flatten((args, kwargs))
        flat.append(v)
    return flat, Shallow(tuple(layout), tuple(kwargs))


class Shallow(tuple):
    """The spec of positional leaves or flat lists of leaves, then keyword leaves: (layout, names)."""

    __slots__ = ()

    def __new__(cls, layout: tuple, names: tuple) -> "Shallow":
        return tuple.__new__(cls, (layout, names))


def unflatten(flat: list, spec: Any) -> tuple[tuple, dict]:
    if spec is FLAT:
        return tuple(flat), {}
    if type(spec) is Shallow:
        layout, names = spec
        args, i = [], 0
        for entry in layout:
            if entry is None:
                args.append(flat[i])
                i += 1
            else:
                kind, n = entry
                args.append(kind(flat[i:i + n]))
                i += n
        return tuple(args), dict(zip(names, flat[i:]))
    return tree_unflatten(flat, spec)


def is_spec(spec: Any) -> bool:
    return spec is FLAT or type(spec) is Shallow or isinstance(spec, TreeSpec)
