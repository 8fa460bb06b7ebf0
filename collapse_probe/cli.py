"""The ``collapse-probe`` command: thin click wrappers over library functions.

    collapse-probe similarity checkpoints/deepvit_micro_d16.safetensors --threshold 0.9
    collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --images ~/photos --format json -o out.json

Every error we can explain is one line on stderr with a non-zero exit code (see ``collapse_probe.errors``); set
COLLAPSE_PROBE_DEBUG=1 to get tracebacks instead.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import CollapseProbeError

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=120, terminal_width=120)


class _Group(click.Group):
    """Turns our exceptions into one-line messages with their exit codes, and Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context):
        if os.environ.get("COLLAPSE_PROBE_DEBUG"):
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except CollapseProbeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no output written", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug of ours: still one line, with a way to see more
            msg = " ".join(str(e).split())[:300]
            click.echo(f"error: internal error {type(e).__name__}: {msg} (COLLAPSE_PROBE_DEBUG=1 shows a traceback)",
                       err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="collapse-probe")
def main() -> None:
    """Measure attention collapse in Vision Transformers (DeepViT, Zhou et al. 2021).

    \b
    Examples:
      collapse-probe similarity checkpoints/vit_micro_d16.safetensors
      collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --threshold 0.9
    """


def emit(text: str, output: Path | None) -> None:
    """Write ``text`` to stdout, or atomically to ``output`` (never a half-written file)."""
    if output is None:
        click.echo(text)
        return
    from .checkpoints import atomic_write

    atomic_write(output, lambda tmp: Path(tmp).write_text(text if text.endswith("\n") else text + "\n"))
    click.echo(f"wrote {output}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model", "model_name", metavar="NAME",
              help="timm architecture name; needed for timm/third-party state dicts, optional for ours.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="A block is similar when its similarity with the previous block(s) exceeds this.")
@click.option("--images", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder of images (recursive). Default: scikit-image's bundled photographs.")
@click.option("--num-images", type=click.IntRange(min=1), metavar="N",
              help="Images to use (default: all in DIR, or the 17 bundled photos; more adds seeded crops).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--reduction", type=click.Choice(["mean", "ratio"]), default="mean", show_default=True,
              help="mean: mean column cosine; ratio: fraction of column cosines above the threshold.")
@click.option("--neighbors", "-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Compare each block with the mean over this many previous blocks.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Write here instead of stdout.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--rank-images", type=click.IntRange(min=1), metavar="N",
              help="Cap the images used for the (SVD-based) attention rank; default all.")
@click.option("--key", help="Entry of a training checkpoint that holds the weights (default: first of state_dict, "
              "model, ...).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow full pickle for this run. Unpickling can execute arbitrary code: only for files you trust.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--max-memory", metavar="SIZE", help="Split batches so the probe's tensors fit, e.g. 2GiB (estimate: "
              "params + per-image maps of every block; see benchmarks/README.md).")
@click.option("--storage", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Precision of the per-batch maps kept for the all-pairs similarity (float16: half the memory, "
              "cosine error < 1e-3).")
def similarity(checkpoint, model_name, threshold, images, num_images, batch_size, reduction, neighbors, fmt, output,
               device, rank_images, key, trust_pickle, progress, max_memory, storage):
    """Cross-layer attention similarity, similar blocks, cross-head similarity and rank of CHECKPOINT.

    \b
    Examples:
      collapse-probe similarity checkpoints/deepvit_micro_d16.safetensors
      collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --threshold 0.9
      collapse-probe similarity ckpt.pt --images ~/val_subset --num-images 256 --format json -o sim.json
      torchrun --nproc-per-node 2 -m collapse_probe similarity ckpt.pt --max-memory 2GiB -o sim.json
    """
    from .distributed import is_main
    from .probe import probe_checkpoint
    from .report import render

    result = probe_checkpoint(checkpoint, model_name, images, num_images, batch_size, threshold, reduction, neighbors,
                              device, trust_pickle, key, rank_images, progress=progress, max_memory=max_memory,
                              storage=storage)
    if is_main():  # under torchrun every rank holds the all-reduced result; one writes it
        emit(render(result, fmt, threshold, neighbors, reduction), output)


if __name__ == "__main__":
    main()
