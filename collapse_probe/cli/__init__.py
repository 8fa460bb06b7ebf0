"""The ``collapse-probe`` command: thin click wrappers over library functions.

    collapse-probe similarity checkpoints/deepvit_micro_d16.safetensors --threshold 0.9
    collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --images ~/photos -o out.json

Every error we can explain is one line on stderr with a non-zero exit code (see ``collapse_probe.errors``); set
COLLAPSE_PROBE_DEBUG=1 to get tracebacks instead.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import click

from .._version import __version__
from ..errors import CollapseProbeError, printable
from ..reports.intervene_options import check_request, intervene_options
from .checks import checkpoint_paths
from .help import SectionedCommand, without
from .options import _default_images, _probe_options, _train_command, emit, intervene_flag, output_format  # noqa: F401

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=120, terminal_width=120)


_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and ``outputs`` clean-up runs."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class _Group(click.Group):
    """Turns our exceptions into one-line messages with their exit codes, Ctrl-C into exit 130 and SIGTERM into 143."""

    def invoke(self, ctx: click.Context):
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (embedded use): keep the host's handler
            return self._invoke(ctx)
        try:
            return self._invoke(ctx)
        finally:  # a host process (tests, notebooks) gets its own handler back
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _invoke(self, ctx: click.Context):
        from ..outputs import committed

        committed.clear()  # what this invocation writes (an embedding process may run several)
        if os.environ.get("COLLAPSE_PROBE_DEBUG"):
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except CollapseProbeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            done = (f"{len(set(committed))} output(s) complete, the last {committed[-1]}; nothing partial left"
                    if committed else "no output written")
            click.echo(f"interrupted: {done}", err=True)
            sys.exit(143 if isinstance(e, _Terminated) else 130)
        except click.UsageError as e:  # bad arguments: one line too, exit code 2 as click does
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:  # stdout closed early (`... | head -1`): one line, exit 141 as a shell reports SIGPIPE
            _quiet_stdout()
            _say("error: standard output was closed before all output was written (broken pipe)")
            sys.exit(141)
        except OSError as e:  # the environment, not a bug: disk full, read-only folder, no permission, ...
            where = f" ({printable(e.filename)})" if e.filename else ""
            storage = e.errno in _STORAGE_ERRORS
            _quiet_stdout()  # it may be stdout that failed (`> /full/disk/file`): no second failure at exit
            _say(f"error: {e.strerror or type(e).__name__}{where}"
                 f"{'; free space or choose another location' if storage else ''}")
            sys.exit(2 if storage else 1)
        except Exception as e:  # a bug of ours: still one line, with a way to see more
            msg = " ".join(str(e).split())[:300]
            click.echo(f"error: internal error {type(e).__name__}: {msg} (COLLAPSE_PROBE_DEBUG=1 shows a traceback)",
                       err=True)
            sys.exit(1)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so Python's final flush of what is still buffered cannot fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (embedded use): nothing to flush into a pipe
        pass


def _say(line: str) -> None:
    """One line on stderr, unless stderr is gone too."""
    try:
        click.echo(line, err=True)
    except OSError:
        pass


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="collapse-probe")
def main() -> None:
    """Measure attention collapse in Vision Transformers (DeepViT, Zhou et al. 2021).

    \b
    Examples:
      collapse-probe similarity checkpoints/deepvit_micro_d16.safetensors   # bundled; probed on its digits
      collapse-probe compare checkpoints/vit_micro_d16.safetensors checkpoints/deepvit_micro_d16.safetensors
      collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --images ~/photos -o sim.json
      collapse-probe train --preset digits --model deepvit_micro --depth 8
    """


@main.command(cls=SectionedCommand, context_settings=CONTEXT,
              short_help="Per-block attention similarity, similar blocks, cross-head "
              "similarity and rank of a checkpoint.")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_paths)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
              help="Default: from --output's extension (.json, .csv; .txt, .md or none: table); table on stdout.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Write here instead of stdout.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time) and the verdict then says it was not judged.")
@intervene_flag
@_probe_options
def similarity(checkpoint, fmt, output, **kwargs):
    """Cross-layer attention similarity, similar blocks, cross-head similarity and rank of CHECKPOINT.

    CHECKPOINT is a safetensors or torch file, a HuggingFace / timm model folder, or a Hub id (timm/NAME, org/name;
    read from huggingface_hub's cache, nothing downloaded with HF_HUB_OFFLINE=1). A model of your own: pass its code
    with --model-code. Under `torchrun --nproc-per-node N -m collapse_probe similarity ...` the images are sharded
    across ranks.

    \b
    Examples:
      collapse-probe similarity checkpoints/vit_micro_d32.safetensors --images builtin:digits
      collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --threshold 0.9
      collapse-probe similarity ckpt.pt --images ~/val_subset --num-images 256 -o sim.json   # format from .json
      collapse-probe similarity ckpt.pt --reduction ratio --entry-threshold 0.9 --block-threshold 0.5
      collapse-probe similarity my_vit.pt --model-code my_vit.py --model MyViT --model-args '{"depth": 6}'
      collapse-probe similarity timm/vit_small_patch16_224.augreg_in21k_ft_in1k --num-images 64
    """
    from ..distributed import is_main
    from ..outputs import file_target, is_stdout
    from ..probing.checked import probe
    from ..reports.text import render

    fmt = output_format(fmt, output)
    if output is not None and not is_stdout(output):
        file_target(output)  # refuse a device node or folder before the probe, not after
    result = probe(checkpoint, **_default_images(checkpoint, kwargs))
    if is_main():  # under torchrun every rank holds the all-reduced result; one writes it
        emit(render(result, fmt), output)


@main.command(cls=SectionedCommand, context_settings=CONTEXT,
              short_help="Every collapse metric and a plain-language verdict, written "
              "as a self-contained report folder.")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_paths)
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), required=True, metavar="DIR",
              help="Report folder: report.md, report.html, metrics.json and the figures (replaced atomically).")
@click.option("--per-image", is_flag=True, help="Keep the per-image rows in metrics.json (enough to re-bootstrap "
              "every interval; tens of MB for deep models). Default: summaries and intervals only.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time).")
@intervene_flag
@_probe_options
def audit(checkpoint, output, **kwargs):
    """Run every collapse metric on CHECKPOINT and write a self-contained report with a verdict.

    CHECKPOINT is a safetensors or torch file, a HuggingFace / timm model folder, or a Hub id (timm/NAME, org/name).

    \b
    Examples:
      collapse-probe audit vit_s.pth --output out/vit_s
      collapse-probe audit train_ckpt.pt --key state_dict_ema --num-heads 6 -o out/ema
      collapse-probe audit hf_vit_folder/ --images ~/val_subset --num-images 64 -o out/hf
      collapse-probe audit checkpoints/vit_micro_d32.safetensors -o out/vit32 --no-intervene   # maps only
    """
    from ..reports.audit import audit as run_audit

    metrics = run_audit(checkpoint, output, **_default_images(checkpoint, kwargs))
    click.echo("\n".join(metrics["summary"]["text"]))
    click.echo(f"wrote {output}/report.html (heads: {metrics['heads_source']})", err=True)


@main.command(cls=SectionedCommand, context_settings=CONTEXT,
              short_help="Side-by-side collapse summary (table, markdown, JSON or CSV) "
              "of two or more checkpoints.")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path), callback=checkpoint_paths)
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Also write compare.md, compare.html, metrics.json and curves.png into this folder.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json", "csv"]), default="table",
              show_default=True, help="What stdout gets: table (one short line per checkpoint), markdown (every "
              "summary column), json (summary and per-block rows) or csv (per-block rows with a checkpoint column).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time).")
@intervene_flag
@_probe_options
def compare(checkpoints, output, fmt, **kwargs):
    """Side-by-side collapse table (and overlaid curves with --output) of two or more CHECKPOINTS.

    \b
    Examples:
      collapse-probe compare checkpoints/vit_micro_d16.safetensors checkpoints/deepvit_micro_d16.safetensors
      collapse-probe compare a.pt b.pt c.pt --num-images 64 --output out/compare
      collapse-probe compare a.pt b.pt --format csv > blocks.csv
    """
    if len(checkpoints) < 2:
        raise click.UsageError("compare needs at least two checkpoints")
    from ..reports.audit import compare as run_compare

    table, _ = run_compare(list(checkpoints), output, fmt=fmt, **_default_images(checkpoints[0], kwargs))
    click.echo(table if fmt == "markdown" else table.rstrip("\n"))


@main.command(cls=SectionedCommand, context_settings=CONTEXT,
              short_help="Check a verdict by intervention (reuse a block's map, skip "
              "blocks, uniform attention): output change.")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_paths)
@intervene_options
@without("rank_images", "baseline_seed")  # no rank and no untrained twin in an intervention report
@_probe_options
def intervene(checkpoint, **kwargs):
    """Intervene on blocks of CHECKPOINT (numbered from 1); measure the top-1 agreement with the unmodified model,
    KL(p_orig || p_intervened), final-feature cosine and accuracy (labelled images), with Wilson 95 % intervals.

    \b
    Examples:
      collapse-probe intervene checkpoints/vit_micro_d32.safetensors --sweep -o out/reuse_sweep
      collapse-probe intervene ckpt.pt --mode reuse --from-block 16     # blocks 17-L reuse block 16's map
      collapse-probe intervene ckpt.pt --mode skip --blocks 30,31,32    # each block skipped alone, one row each
    """
    check_request(kwargs["from_block"], kwargs["blocks"], kwargs["sweep"], kwargs["source"])  # before torch
    from ..reports.intervene import command

    text, output = command(checkpoint, **_default_images(checkpoint, kwargs))
    click.echo(text)
    if output is not None:
        click.echo(f"wrote {output}", err=True)


@main.command(context_settings=CONTEXT, short_help="Train ViT / DeepViT: timm recipe, AMP, torchrun DDP, exact "
              "resume, collapse tracking, TensorBoard.")
@_train_command
def train(config_file, preset, model, depth, data_dir, epochs, batch_size, lr, output, device, amp, compile_, workers,
          resume, initial_checkpoint, sets, print_config, progress):
    """Train ViT / DeepViT (timm recipe, bf16, torch.compile, DDP via torchrun, exact --resume, collapse tracking).

    Each run writes config.json, last.pt, best.safetensors, final.safetensors, log.csv, collapse.csv and, when the
    tensorboard package is installed, TensorBoard events (tensorboard --logdir runs/train). Epochs are numbered from
    1 everywhere (the epoch column of log.csv and collapse.csv is the epoch just finished). A folder that is not new,
    empty or a run of ours is refused untouched; nothing is written before settings, data and --resume's last.pt
    have been checked.

    \b
    Examples:
      collapse-probe train --preset digits --model deepvit_micro --depth 16 -o runs/deepvit16
      collapse-probe train -c recipe.yaml --lr 5e-4 -o runs/recipe           # the file, then the options
      collapse-probe train -o runs/deepvit16 --resume                       # continue runs/deepvit16/last.pt
      collapse-probe train -o runs/deepvit16 --resume --epochs 80           # train a finished run longer
      collapse-probe train --initial-checkpoint runs/deepvit16/final.safetensors --epochs 5 -o runs/ft
      torchrun --nproc-per-node 8 -m collapse_probe train --preset paper --model deepvit_32b \\
          --data-dir /data/imagenet --compile -o runs/d32
      collapse-probe train --preset digits --set attn_reuse_from=3 --set cosine_reg=0.1 -o runs/reuse
    """
    from ..train.cli import run_train

    run_train(preset, sets, print_config, depth=depth, config_file=config_file, resume=resume, model=model,
              data_dir=data_dir, epochs=epochs, batch_size=batch_size, lr=lr, output=output, device=device, amp=amp,
              compile=compile_, workers=workers, initial_checkpoint=initial_checkpoint, progress=progress)


@main.command(cls=SectionedCommand, context_settings=CONTEXT,
              short_help="Regenerate the paper's Fig. 1, 3, 4 and 8 from checkpoints, "
              "with their numbers as CSV.")
@click.option("--checkpoints", "checkpoints", multiple=True, type=click.Path(path_type=Path), metavar="DIR|CKPT",
              callback=checkpoint_paths, help="Checkpoint files or folders of them (repeatable; more may follow as "
              "arguments).")
@click.argument("more", nargs=-1, type=click.Path(path_type=Path), metavar="[CKPT]...", callback=checkpoint_paths)
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), required=True, metavar="DIR",
              help="Folder for the figures (PNG + PDF) and their CSV numbers; replaced as a whole, and only if "
              "collapse-probe wrote all of it.")
@click.option("--per-model", is_flag=True, help="Per-model figures for every checkpoint, not only the deepest ViT "
              "and DeepViT.")
@click.option("--pdf/--no-pdf", default=True, show_default=True, help="Also write each figure as PDF.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time).")
@intervene_flag
@_probe_options
def figures(checkpoints, more, output, per_model, pdf, **kwargs):
    """Regenerate the paper's Fig. 1, 3, 4 and 8 analyses from checkpoints, with the numbers as CSV.

    \b
    Examples:
      collapse-probe figures --checkpoints checkpoints/ --images builtin:digits --output figures/digits
      collapse-probe figures vit_micro_d16.safetensors deepvit_micro_d16.safetensors -o out/figs --no-pdf
      collapse-probe figures checkpoints/ --images ~/val_subset --num-images 256 --per-model -o out/val
    """
    from ..reports.figures import make_figures, resolve_checkpoints

    paths = [*checkpoints, *more]
    if not paths:
        raise click.UsageError("no checkpoints given; pass checkpoint files or folders (or --checkpoints DIR)")
    first = resolve_checkpoints(paths)[0]  # images as similarity would choose them (the dataset it was trained on)
    report = make_figures(paths, output, per_model, ("png", "pdf") if pdf else ("png",),
                          **_default_images(first, kwargs))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {len(report.written)} files to {output} from {len(report.runs)} checkpoints", err=True)


if __name__ == "__main__":
    main()
