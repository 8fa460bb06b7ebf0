"""The ``intervene`` command's own options (click only: ``collapse-probe --help`` must not import torch).

    @intervene_options          # --mode, --from-block, --blocks, --source, --sweep, --format, --output
    def intervene(checkpoint, mode, from_block, blocks, source, sweep, fmt, output, **probe_options): ...
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

MAX_BLOCK = 10_000  # no model has more blocks (stored configs are capped at 1024): bounds a range before it is expanded


def block_list(_ctx: Any, _param: Any, value: str | None) -> list[int] | None:
    """Parse "5,6,9-12" into sorted 1-based block numbers (click reports a bad value with exit code 2); every number
    is checked before a range is expanded, so "1-3000000000" is one line, not a memory error."""
    if value is None:
        return None
    spans: list[tuple[int, int]] = []
    try:
        for part in value.split(","):
            a, dash, b = part.strip().partition("-")
            spans.append((int(a), int(b) if dash else int(a)))
    except ValueError as e:
        raise click.BadParameter(f"expected block numbers like 5,6 or 9-12, got {value!r}") from e
    for a, b in spans:
        if a < 1:
            raise click.BadParameter(f"block numbers start at 1, got {value!r}")
        if b < a:
            raise click.BadParameter(f"range {a}-{b} runs backwards; write {b}-{a}")
        if b > MAX_BLOCK:
            raise click.BadParameter(f"block {b} is beyond any model (at most {MAX_BLOCK} blocks)")
    return sorted({n for a, b in spans for n in range(a, b + 1)})


def check_request(from_block: int | None, blocks: list[int] | None, sweep: bool, source: int | None) -> None:
    """Exactly one of --from-block, --blocks, --sweep; --source only with --blocks (checked before torch is even
    imported, so a wrong request is one quick line)."""
    from ..errors import BadArgumentError

    given = [n for n, v in (("--from-block", from_block is not None), ("--blocks", bool(blocks)), ("--sweep", sweep))
             if v]
    if len(given) != 1:
        raise BadArgumentError("choose exactly one of --from-block K, --blocks B,B,... and --sweep" +
                               (f" (got {', '.join(given)})" if given else ""))
    if source is not None and not blocks:
        raise BadArgumentError("--source applies to --blocks (with --from-block K the source is block K)")
    for b in [*(blocks or []), *([from_block] if from_block is not None else []), source]:
        if b is not None and b < 1:
            raise BadArgumentError(f"block numbers start at 1, got {b}")


OPTIONS = [
    click.option("--mode", type=click.Choice(["reuse", "skip", "uniform"]), default="reuse", show_default=True,
                 help="reuse: multiply V by an earlier block's applied map (the softmax map; after Θ + Norm in "
                 "Re-attention blocks); skip: remove the block's residual branches (output = input); uniform: the "
                 "map becomes 1/N."),
    click.option("--from-block", type=click.IntRange(1, MAX_BLOCK), metavar="K", help="Intervene on every block "
                 "after block K (1-based); reuse: they all use block K's map (the paper's experiment)."),
    click.option("--blocks", callback=block_list, metavar="B,B", help="Intervene on each of these blocks alone, one "
                 "result each (e.g. 5,6 or 9-12); reuse takes the map of --source, else of the block before."),
    click.option("--source", type=click.IntRange(1, MAX_BLOCK), metavar="N", help="With --mode reuse --blocks: the "
                 "block whose map they reuse (default: the block before each)."),
    click.option("--sweep", is_flag=True, help="For every K: the intervention on all blocks after K, one row each."),
    click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
                 help="What stdout gets."),
    click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
                 help="Also write intervention.csv, .json and .png (output change next to the similarity curve) into "
                 "this folder; replaced as a whole, and only if collapse-probe wrote all of it."),
]


def intervene_options(f: Callable) -> Callable:
    for option in reversed(OPTIONS):
        f = option(f)
    return f
