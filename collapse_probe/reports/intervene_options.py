"""The ``intervene`` command's own options (click only: ``collapse-probe --help`` must not import torch).

    @intervene_options          # --mode, --from-block, --blocks, --source, --sweep, --format, --output
    def intervene(checkpoint, mode, from_block, blocks, source, sweep, fmt, output, **probe_options): ...
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def block_list(_ctx: Any, _param: Any, value: str | None) -> list[int] | None:
    """Parse "5,6,9-12" into sorted 1-based block numbers (click reports a bad value with exit code 2)."""
    if value is None:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            a, _, b = part.strip().partition("-")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError as e:
        raise click.BadParameter(f"expected block numbers like 5,6 or 9-12, got {value!r}") from e
    if not out or min(out) < 1:
        raise click.BadParameter(f"block numbers start at 1, got {value!r}")
    return sorted(set(out))


OPTIONS = [
    click.option("--mode", type=click.Choice(["reuse", "skip", "uniform"]), default="reuse", show_default=True,
                 help="reuse: multiply V by an earlier block's applied map (the softmax map; after Θ + Norm in "
                 "Re-attention blocks); skip: remove the block's residual branches (output = input); uniform: the "
                 "map becomes 1/N."),
    click.option("--from-block", type=click.IntRange(min=1), metavar="K", help="Intervene on every block after block "
                 "K (1-based); reuse: they all use block K's map (the paper's experiment)."),
    click.option("--blocks", callback=block_list, metavar="B,B", help="Intervene on each of these blocks alone, one "
                 "result each (e.g. 5,6 or 9-12); reuse takes the map of --source, else of the block before."),
    click.option("--source", type=click.IntRange(min=1), metavar="N", help="With --mode reuse --blocks: the block "
                 "whose map they reuse (default: the block before each)."),
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
