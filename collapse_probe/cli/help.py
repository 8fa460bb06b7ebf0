"""``--help`` with the options under headings: the command's own first, then the shared ones by what they are about.

    @main.command(cls=SectionedCommand, ...)      # sections: Options, Checkpoint loading, Images, Measurement, Output

click prints every option in one list; with the ~20 options every probing command shares that list was 60 lines in
no order a reader could follow. Here an option's section is decided by its name (``SECTIONS``); options of no section
(a command's own, and --help) come first under "Options".
"""
from __future__ import annotations

import click

SECTIONS: dict[str, tuple[str, ...]] = {
    "Checkpoint loading": ("model_name", "model_code", "model_args", "num_heads", "key", "prefix", "trust_pickle"),
    "Images": ("images", "num_images", "batch_size", "mean", "std", "workers"),
    "Measurement": ("threshold", "entry_threshold", "neighbors", "reduction", "baseline", "intervene", "baseline_seed",
                    "rank_images", "max_memory", "storage", "device"),
    "Output": ("fmt", "output", "per_model", "pdf", "progress"),
}
_SECTION_OF = {name: title for title, names in SECTIONS.items() for name in names}


class SectionedCommand(click.Command):
    """A click command whose --help lists its options under ``SECTIONS``' headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {"Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None  # arguments: usage
            if record is not None:
                groups.setdefault(_SECTION_OF.get(param.name or "", "Options"), []).append(record)
        for title in ("Options", *SECTIONS):
            if groups.get(title):
                with formatter.section(title):
                    formatter.write_dl(groups[title])


def without(*names: str):
    """Decorator: drop the options ``names`` (parameter names) that earlier decorators added, for a command in which
    they would do nothing (so its --help does not offer them)."""
    def apply(f):
        f.__click_params__ = [p for p in getattr(f, "__click_params__", []) if p.name not in names]
        return f
    return apply
