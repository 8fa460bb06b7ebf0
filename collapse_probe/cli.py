"""The ``collapse-probe`` command: thin click wrappers over library functions.

    collapse-probe similarity checkpoints/deepvit_micro_d16.safetensors --threshold 0.9
    collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --images ~/photos -o out.json

Every error we can explain is one line on stderr with a non-zero exit code (see ``collapse_probe.errors``); set
COLLAPSE_PROBE_DEBUG=1 to get tracebacks instead.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from ._version import __version__
from .errors import CollapseProbeError
from .reports.intervene_options import intervene_options

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=120, terminal_width=120)


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
        from .outputs import committed

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
      collapse-probe similarity checkpoints/deepvit_micro_d16.safetensors   # bundled; probed on its digits
      collapse-probe compare checkpoints/vit_micro_d16.safetensors checkpoints/deepvit_micro_d16.safetensors
      collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --images ~/photos -o sim.json
      collapse-probe train --preset digits --model deepvit_micro --depth 8
    """


def emit(text: str, output: Path | None) -> None:
    """Write ``text`` to stdout (no ``output``, or ``-``), or atomically to ``output`` (never a half-written file)."""
    from .outputs import is_stdout, write_file

    if output is None or is_stdout(output):
        click.echo(text)
        return
    write_file(output, lambda tmp: Path(tmp).write_text(text if text.endswith("\n") else text + "\n"))
    click.echo(f"wrote {output}", err=True)


_EXTENSION_FORMATS = {".json": "json", ".csv": "csv", ".txt": "table", ".md": "table", "": "table"}


def output_format(fmt: str | None, output: Path | None) -> str:
    """The format to write: ``--format``, else inferred from ``-o``'s extension (.json, .csv; .txt/.md/none: table).

    An explicit format that contradicts a known extension (``--format csv -o out.json``) is refused, because the file
    would not be what its name says.
    """
    from .errors import BadArgumentError
    from .outputs import is_stdout

    ext = output.suffix.lower() if output is not None and not is_stdout(output) else None
    implied = _EXTENSION_FORMATS.get(ext) if ext is not None else None
    if fmt is None:
        return implied or "table"
    if implied is not None and implied != fmt:
        raise BadArgumentError(f"--format {fmt} contradicts --output {output} ({ext or 'no extension'} means "
                               f"{implied}); drop --format or rename the file")
    return fmt


def _default_images(checkpoint: Path, kwargs: dict) -> dict:
    """``kwargs`` with --images defaulted to the set the checkpoint was trained on, when our trainer recorded one
    that has a built-in twin (digits); else unchanged (the probe's default, builtin:photos)."""
    if kwargs.get("images") is not None:
        return kwargs
    from .train.provenance import matching_images

    match = matching_images(checkpoint)
    if match is None:
        return kwargs
    click.echo(f"note: images: {match[0]} (the dataset this checkpoint was trained on)", err=True)
    return {**kwargs, "images": match[0]}


def _floats(_ctx, _param, value: str | None) -> tuple[float, ...] | None:
    """Parse "0.5,0.5,0.5" (click reports a bad value with exit code 2)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from e


def _probe_options(f):
    """Options shared by ``similarity``, ``audit`` and ``compare``: how to read checkpoints and what to run them on."""
    options = [
        click.option("--model", "model_name", metavar="NAME", help="timm architecture name; wins over anything in "
                     "the file. Default: the file's metadata, else inferred from the weight shapes."),
        click.option("--num-heads", type=click.IntRange(min=1), metavar="N",
                     help="Heads, when the file cannot show them (see the heads rule in the README)."),
        click.option("--mean", callback=_floats, metavar="M,M,M", help="Input normalisation mean (with --std)."),
        click.option("--std", callback=_floats, metavar="S,S,S", help="Input normalisation std (with --mean)."),
        click.option("--key", help="Entry of a training checkpoint that holds the weights (default: the first of "
                     "state_dict, model, module, state_dict_ema, model_ema, teacher, student)."),
        click.option("--prefix", metavar="PREFIX", help="Only keys under PREFIX are the model's (e.g. model or net "
                     "in a Lightning file; the prefix is removed, other keys dropped). Default: wrapper prefixes "
                     "shared by every key, and a Lightning file's model next to its loss buffers."),
        click.option("--trust-pickle", is_flag=True, help="Allow full pickle for this run. Unpickling can execute "
                     "arbitrary code: only for files you trust."),
        click.option("--images", type=click.Path(path_type=Path), metavar="DIR",
                     help="Folder of images (recursive), builtin:photos (scikit-image's photographs) or "
                     "builtin:digits (scikit-learn digits). Default: digits for a checkpoint our trainer made on "
                     "digits (its metadata says so), else photos."),
        click.option("--num-images", type=click.IntRange(1, 1 << 24), metavar="N",
                     help="Images to use (default: all in DIR or the set; for photos, more adds seeded crops)."),
        click.option("--batch-size", type=click.IntRange(1, 1 << 16), default=16, show_default=True),
        click.option("--block-threshold", "--threshold", "threshold", type=click.FloatRange(0, 1), default=0.9,
                     show_default=True, help="Block criterion: a block is similar when its similarity with the "
                     "previous block(s) (under --reduction) exceeds this."),
        click.option("--entry-threshold", type=click.FloatRange(0, 1), default=0.9, show_default=True,
                     help="Per-entry cut of --reduction ratio: the fraction of column cosines above this is the "
                     "block's similarity."),
        click.option("--neighbors", "-k", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Compare each block with the mean over this many previous blocks."),
        click.option("--reduction", type=click.Choice(["mean", "ratio"]), default="mean", show_default=True,
                     help="mean: mean column cosine; ratio: fraction of column cosines above --entry-threshold "
                     "(two readings of the paper, whose own reduction is unpublished)."),
        click.option("--baseline-seed", type=int, default=0, show_default=True, metavar="SEED",
                     help="Seed of the untrained twin's initialisation."),
        click.option("--rank-images", type=click.IntRange(min=0), default=16, show_default=True, metavar="N",
                     callback=lambda _c, _p, v: v or None,
                     help="Images whose maps enter the (SVD-based) attention rank, the costly metric; 0: all."),
        click.option("--max-memory", metavar="SIZE", help="Split batches so the probe's tensors fit, e.g. 2GiB "
                     "(estimate: params + per-image maps of every block; see benchmarks/README.md)."),
        click.option("--storage", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                     show_default=True, help="Precision of the per-batch maps kept for the all-pairs similarity "
                     "(float16: half the memory, cosine error < 1e-3)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command(context_settings=CONTEXT, short_help="Per-block attention similarity, similar blocks, cross-head "
              "similarity and rank of a checkpoint.")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
              help="Default: from --output's extension (.json, .csv; .txt, .md or none: table); table on stdout.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Write here instead of stdout.")
@click.option("--baseline/--no-baseline", default=False, show_default=True,
              help="Also measure the untrained twin (same architecture, fresh init, same images) and show it beside.")
@_probe_options
def similarity(checkpoint, fmt, output, **kwargs):
    """Cross-layer attention similarity, similar blocks, cross-head similarity and rank of CHECKPOINT.

    CHECKPOINT is a safetensors or torch file, or a HuggingFace / timm model folder. Under
    `torchrun --nproc-per-node N -m collapse_probe similarity ...` the images are sharded across ranks.

    \b
    Examples:
      collapse-probe similarity checkpoints/vit_micro_d32.safetensors --images builtin:digits
      collapse-probe similarity vit_s.pt --model vit_small_patch16_224 --threshold 0.9
      collapse-probe similarity ckpt.pt --images ~/val_subset --num-images 256 -o sim.json   # format from .json
      collapse-probe similarity ckpt.pt --baseline --reduction ratio --entry-threshold 0.9 --block-threshold 0.5
    """
    from .distributed import is_main
    from .outputs import file_target, is_stdout
    from .probing.run import probe
    from .reports.text import render

    fmt = output_format(fmt, output)
    if output is not None and not is_stdout(output):
        file_target(output)  # refuse a device node or folder before the probe, not after
    result = probe(checkpoint, **_default_images(checkpoint, kwargs))
    if is_main():  # under torchrun every rank holds the all-reduced result; one writes it
        emit(render(result, fmt), output)


@main.command(context_settings=CONTEXT, short_help="Every collapse metric and a plain-language verdict, written "
              "as a self-contained report folder.")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), required=True, metavar="DIR",
              help="Report folder: report.md, report.html, metrics.json and the figures (replaced atomically).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time).")
@_probe_options
def audit(checkpoint, output, **kwargs):
    """Run every collapse metric on CHECKPOINT and write a self-contained report with a verdict.

    CHECKPOINT is a safetensors or torch file, or a HuggingFace / timm model folder.

    \b
    Examples:
      collapse-probe audit vit_s.pth --output out/vit_s
      collapse-probe audit train_ckpt.pt --key state_dict_ema --num-heads 6 -o out/ema
      collapse-probe audit hf_vit_folder/ --images ~/val_subset --num-images 64 -o out/hf
    """
    from .reports.audit import audit as run_audit

    metrics = run_audit(checkpoint, output, **_default_images(checkpoint, kwargs))
    click.echo("\n".join(metrics["summary"]["text"]))
    click.echo(f"wrote {output}/report.html (heads: {metrics['heads_source']})", err=True)


@main.command(context_settings=CONTEXT, short_help="Side-by-side collapse summary (table, markdown, JSON or CSV) "
              "of two or more checkpoints.")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Also write compare.md, compare.html, metrics.json and curves.png into this folder.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json", "csv"]), default="table",
              show_default=True, help="What stdout gets: table (one short line per checkpoint), markdown (every "
              "summary column), json (summary and per-block rows) or csv (per-block rows with a checkpoint column).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time).")
@_probe_options
def compare(checkpoints, output, fmt, **kwargs):
    """Side-by-side collapse table (and overlaid curves with --output) of two or more CHECKPOINTS.

    \b
    Examples:
      collapse-probe compare checkpoints/vit_micro_d16.safetensors checkpoints/deepvit_micro_d16.safetensors
      collapse-probe compare a.pt b.pt c.pt --num-images 64 --output out/compare
      collapse-probe compare a.pt b.pt --format csv > blocks.csv
    """
    from .reports.audit import compare as run_compare
    from .reports.audit import render_compare

    table, results = run_compare(list(checkpoints), output, **_default_images(checkpoints[0], kwargs))
    s = kwargs
    click.echo(table if fmt == "markdown" else
               render_compare(results, fmt, s["threshold"], s["neighbors"], s["reduction"]).rstrip("\n"))


@main.command(context_settings=CONTEXT, short_help="Check a verdict by intervention (reuse a block's map, skip "
              "blocks, uniform attention): output change.")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@intervene_options
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
    from .reports.intervene import command

    text, output = command(checkpoint, **_default_images(checkpoint, kwargs))
    click.echo(text)
    if output is not None:
        click.echo(f"wrote {output}", err=True)


def _preset_help() -> str:
    from .train.config import PRESET_HELP  # no torch: train/__init__ loads the engine only when it is used

    return ("Named recipe; other options override it (default: the --config file's preset, else digits). " +
            " ".join(f"[{name}] {text}." for name, text in PRESET_HELP.items()))


def _train_command(f):
    from .train.config import PRESETS

    options = [
        click.option("--config", "-c", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     metavar="FILE.yaml", help="TrainConfig keys in YAML (see --print-config); options override it; "
                     "unknown keys fail."),
        click.option("--preset", type=click.Choice(list(PRESETS)), help=_preset_help()),
        click.option("--model", metavar="NAME", help="Architecture (e.g. deepvit_32b, vit_micro)."),
        click.option("--depth", type=click.IntRange(min=1), help="Override the model's number of blocks."),
        click.option("--data-dir", type=click.Path(path_type=Path), help="ImageNet-style folder with train/ and val/."),
        click.option("--epochs", type=click.IntRange(min=1)),
        click.option("--batch-size", type=click.IntRange(min=1), help="Per process."),
        click.option("--lr", type=float),
        click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), help="Run folder (default: "
                     "a new runs/train/version_N). An existing run is continued only with --resume."),
        click.option("--device", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)."),
        click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "none"]),
                     help="Autocast (auto: bf16 on CUDA)."),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model."),
        click.option("--workers", type=click.IntRange(min=0), help="Data-loading worker processes."),
        click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[PATH]",
                     help="Continue a run: alone, from OUTPUT/last.pt (a fresh start if there is none yet; without "
                     "-o, the latest runs/train/version_N); with PATH, from that last.pt. Settings that change "
                     "the numbers must match the checkpoint's (the differing keys are named)."),
        click.option("--initial-checkpoint", type=click.Path(path_type=Path), metavar="PATH",
                     help="Start from these weights (safetensors or a last.pt; every loading check applies), with a "
                     "fresh optimiser and schedule: fine-tuning."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key (JSON values, checked against the key's type), e.g. --set "
                     "mixup=0.1 --set attn_reuse_from=7."),
        click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress on stderr: bars on a terminal, one line per phase otherwise."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command(context_settings=CONTEXT, short_help="Train ViT / DeepViT: timm recipe, AMP, torchrun DDP, exact "
              "resume, collapse tracking, TensorBoard.")
@_train_command
def train(config_file, preset, model, depth, data_dir, epochs, batch_size, lr, output, device, amp, compile_, workers,
          resume, initial_checkpoint, sets, print_config, progress):
    """Train ViT / DeepViT (timm recipe, bf16, torch.compile, DDP via torchrun, exact --resume, collapse tracking).

    Each run writes config.json, last.pt, best.safetensors, final.safetensors, log.csv, collapse.csv and, when the
    tensorboard package is installed, TensorBoard events (tensorboard --logdir runs/train).

    \b
    Examples:
      collapse-probe train --preset digits --model deepvit_micro --depth 16 -o runs/deepvit16
      collapse-probe train -c recipe.yaml --lr 5e-4 -o runs/recipe           # the file, then the options
      collapse-probe train -o runs/deepvit16 --resume                       # continue runs/deepvit16/last.pt
      collapse-probe train --initial-checkpoint runs/deepvit16/final.safetensors --epochs 5 -o runs/ft
      torchrun --nproc-per-node 8 -m collapse_probe train --preset paper --model deepvit_32b \\
          --data-dir /data/imagenet --compile -o runs/d32
      collapse-probe train --preset digits --set attn_reuse_from=3 --set cosine_reg=0.1 -o runs/reuse
    """
    from .train.cli import run_train

    run_train(preset, sets, print_config, depth=depth, config_file=config_file, resume=resume, model=model,
              data_dir=data_dir, epochs=epochs, batch_size=batch_size, lr=lr, output=output, device=device, amp=amp,
              compile=compile_, workers=workers, initial_checkpoint=initial_checkpoint, progress=progress)


@main.command(context_settings=CONTEXT, short_help="Regenerate the paper's Fig. 1, 3, 4 and 8 from checkpoints, "
              "with their numbers as CSV.")
@click.option("--checkpoints", "-c", "checkpoints", multiple=True, type=click.Path(path_type=Path),
              metavar="DIR|CKPT", help="Checkpoint files or folders of them (repeatable; more may follow as "
              "arguments).")
@click.argument("more", nargs=-1, type=click.Path(path_type=Path), metavar="[CKPT]...")
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), default=Path("figures"),
              show_default=True, help="Folder for the figures (PNG + PDF) and their CSV numbers; replaced as a whole, "
              "and only if collapse-probe wrote all of it.")
@click.option("--per-model", is_flag=True, help="Per-model figures for every checkpoint, not only the deepest ViT "
              "and DeepViT.")
@click.option("--pdf/--no-pdf", default=True, show_default=True, help="Also write each figure as PDF.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure the untrained twin (same architecture, fresh init, same images) and judge collapse beyond "
              "it; --no-baseline skips it (about half the time).")
@_probe_options
def figures(checkpoints, more, output, per_model, pdf, **kwargs):
    """Regenerate the paper's Fig. 1, 3, 4 and 8 analyses from checkpoints, with the numbers as CSV.

    \b
    Examples:
      collapse-probe figures --checkpoints checkpoints/ --images builtin:digits --output figures/digits
      collapse-probe figures -c vit_micro_d16.safetensors deepvit_micro_d16.safetensors -o out/figs --no-pdf
      collapse-probe figures -c checkpoints/ --images ~/val_subset --num-images 256 --per-model
    """
    from .reports.figures import make_figures

    report = make_figures([*checkpoints, *more], output, per_model, ("png", "pdf") if pdf else ("png",), **kwargs)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {len(report.written)} files to {output} from {len(report.runs)} checkpoints", err=True)


if __name__ == "__main__":
    main()
