"""Block numbers as people read them: "1, 4-9, 12".

    spans([1, 4, 5, 6, 9])      # "1, 4-6, 9"
    blocks_text([7])            # "block 7"; blocks_text([7, 8]) -> "blocks 7-8"
"""
from __future__ import annotations

from collections.abc import Sequence


def runs(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs [(first, last), ...] of sorted numbers."""
    out: list[tuple[int, int]] = []
    for b in numbers:
        if out and b == out[-1][1] + 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def spans(numbers: Sequence[int]) -> str:
    """"1, 4-9, 12" (or "none")."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs(sorted(numbers))) or "none"


def blocks_text(numbers: Sequence[int]) -> str:
    """"block 7" or "blocks 7-8, 12" (singular for one block)."""
    return f"block{'s' if len(numbers) != 1 else ''} {spans(numbers)}"
