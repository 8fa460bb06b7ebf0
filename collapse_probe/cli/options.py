"""Options and helpers the commands share: how to read checkpoints and images, output formats, the trainer's flags.

Kept apart from the commands so each command stays a few lines; nothing here imports torch (``--help`` stays fast).
"""
from __future__ import annotations

from pathlib import Path

import click

from .checks import device_name, images_path


def emit(text: str, output: Path | None) -> None:
    """Write ``text`` to stdout (no ``output``, or ``-``), or atomically to ``output`` (never a half-written file)."""
    from ..outputs import is_stdout, write_file

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
    from ..errors import BadArgumentError
    from ..outputs import is_stdout

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
    from ..loading.provenance import matching_images

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


# similarity, audit, compare and figures: whether the verdict measures redundancy or judges from the maps alone
intervene_flag = click.option(
    "--intervene/--no-intervene", default=True, show_default=True,
    help="Measure each block's redundancy by intervention (reuse the previous block's map in it alone, skip each "
    "redundant block alone as the baseline, then the last redundant run sharing one map) and rest the verdict on it; "
    "--no-intervene judges from the maps alone (up to two forward passes per block fewer).")


def _probe_options(f):
    """Options shared by ``similarity``, ``audit``, ``compare``, ``figures`` and ``intervene``: how to read checkpoints
    and what to run them on."""
    options = [
        click.option("--model", "model_name", metavar="NAME", help="timm architecture name, or with --model-code "
                     "the class or function in your code that builds the model; wins over anything in the file. "
                     "Default: the file's metadata, else inferred from the weight shapes."),
        click.option("--model-code", metavar="FILE.py|MODULE", help="Your own model's code, imported before the "
                     "model is built so that --model names a class or function in it (or a timm name it registers). "
                     "This RUNS that code: only code you trust (your own). The checkpoint is still read with every "
                     "safety check and loaded strictly."),
        click.option("--model-args", metavar="JSON", help="Keyword arguments for --model, as a JSON object, e.g. "
                     "'{\"depth\": 6, \"heads\": 8}'."),
        click.option("--num-heads", type=click.IntRange(min=1), metavar="N",
                     help="Heads, when the file cannot show them (see the heads rule in the README)."),
        click.option("--mean", callback=_floats, metavar="M,M,M", help="Input normalisation mean (with --std), one "
                     "value per model channel (one for a grey model)."),
        click.option("--std", callback=_floats, metavar="S,S,S", help="Input normalisation std (with --mean), one "
                     "value per model channel."),
        click.option("--key", help="Entry of a training checkpoint that holds the weights (default: the first of "
                     "state_dict, model, module, state_dict_ema, model_ema, teacher, student)."),
        click.option("--prefix", metavar="PREFIX", help="Only keys under PREFIX are the model's (e.g. model or net "
                     "in a Lightning file; the prefix is removed, other keys dropped). Default: wrapper prefixes "
                     "shared by every key, and a Lightning file's model next to its loss buffers."),
        click.option("--trust-pickle", is_flag=True, help="Allow full pickle for this run. Unpickling can execute "
                     "arbitrary code: only for files you trust."),
        click.option("--images", type=click.Path(path_type=Path), metavar="DIR", callback=images_path,
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
        click.option("--device", default="auto", show_default=True, callback=device_name,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _preset_help() -> str:
    from ..train.config import PRESET_HELP  # no torch: train/__init__ loads the engine only when it is used

    return ("Named recipe; other options override it (default: the --config file's preset, else digits). " +
            " ".join(f"[{name}] {text}." for name, text in PRESET_HELP.items()))


def _train_command(f):
    from ..train.config import PRESETS

    options = [
        click.option("--config", "-c", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     metavar="FILE.yaml", help="TrainConfig keys in YAML (see --print-config); options override it, "
                     "model_args merge key by key; unknown keys and out-of-range values fail."),
        click.option("--preset", type=click.Choice(list(PRESETS)), help=_preset_help()),
        click.option("--model", metavar="NAME", help="Architecture (e.g. deepvit_32b, vit_micro)."),
        click.option("--depth", type=click.IntRange(min=1), help="Override the model's number of blocks."),
        click.option("--data-dir", type=click.Path(path_type=Path), help="ImageNet-style folder with train/ and val/."),
        click.option("--epochs", type=click.IntRange(min=1), help="Epochs to train. With --resume, left out: "
                     "the run's own length; given: the run's new length (schedule stretched from the current step)."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Per process."),
        click.option("--lr", type=float),
        click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), help="Run folder (default: "
                     "a new runs/train/version_N): new, empty, or a run of ours (any other folder is refused, "
                     "untouched). An existing run is continued only with --resume."),
        click.option("--device", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)."),
        click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "none"]),
                     help="Autocast (auto: bf16 on CUDA)."),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model."),
        click.option("--workers", type=click.IntRange(min=0), help="Data-loading worker processes."),
        click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[PATH]",
                     help="Continue a run: alone, from OUTPUT/last.pt (a fresh start if there is none yet; without "
                     "-o, the latest runs/train/version_N); with PATH, from that last.pt. Settings that change "
                     "the numbers must match the checkpoint's (the differing keys are named); --epochs may change "
                     "the length. A finished run does nothing."),
        click.option("--initial-checkpoint", type=click.Path(path_type=Path), metavar="PATH",
                     help="Start from these weights (safetensors or a last.pt; every loading check applies), with a "
                     "fresh optimiser and schedule: fine-tuning."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key (JSON values, checked against the key's type and range), e.g. "
                     "--set mixup=0.1 --set attn_reuse_from=7 --set model_args.depth=12 (null removes a key)."),
        click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress on stderr: bars on a terminal, one line per phase otherwise."),
    ]
    for option in reversed(options):
        f = option(f)
    return f
