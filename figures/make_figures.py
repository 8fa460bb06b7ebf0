"""Regenerate figures/ from the bundled checkpoints with one command (from the repository root):

    python figures/make_figures.py                       # checkpoints/*.safetensors -> figures/
    python figures/make_figures.py --checkpoints DIR --output OUT --num-images 128 --no-pdf

The bundled checkpoints were trained on scikit-learn's digits, so they are probed with the images they were
validated on: the same fixed, stratified 20% split (360 images, split seed 0), written as 8x8 PNGs to a temporary
folder and resized by the model's own eval transform, exactly as ``collapse-probe figures --images DIR`` would.
Everything else is ``collapse-probe figures``; any extra arguments are passed on to it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_digits_val(folder: Path) -> int:
    """The digits validation split as PNGs (grey levels 0..16 -> 0..255); returns the count."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    _, val, _, labels = train_test_split(images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    for i, (img, y) in enumerate(zip(val, labels)):
        Image.fromarray(img).convert("RGB").save(folder / f"{i:03d}_{y}.png")
    return len(val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="folder or file (default: checkpoints/)")
    p.add_argument("--output", default=str(ROOT / "figures"), help="default: figures/")
    p.add_argument("--num-images", default="360", help="digits validation images to probe with (default: all 360)")
    args, rest = p.parse_known_args()
    from collapse_probe.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="digits-val-") as tmp:
        write_digits_val(Path(tmp))
        cli(["figures", "--checkpoints", args.checkpoints, "--output", args.output, "--images", tmp,
             "--num-images", args.num_images, *rest])


if __name__ == "__main__":
    main()
