"""Progress bars for long transfers: shown on a terminal only, and only for large tensors."""
from __future__ import annotations

import sys
from typing import Any

SHOW_FROM_BYTES = 64 << 20


class _Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def transfer_bar(total: int, description: str) -> Any:
    """A tqdm bar counting bytes when stderr is a terminal and the transfer is large; else silent."""
    if total < SHOW_FROM_BYTES or not sys.stderr.isatty():
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, file=sys.stderr)
