"""What ``--precision bf16`` (or fp16) changes in the maps: every method's maps of the
same images under autocast against float32, through ``cam_cli.explain`` (the code the
CLI runs). Not a test: it prints, per method, the largest and the mean absolute
difference of the finished maps (min-maxed to [0, 1], at the model's input size), how
many images explain another class, and the Pearson correlation of the maps.

    python bench/precision.py --model efficientnet_lite0 --images sample_images
    python bench/precision.py --model resnet50 --weights NONE --methods gradcam,layercam

Only the model runs under autocast; camx computes the captured activation, its
gradient, the weighting and the upsampling in float32, so what differs comes from
the model's own arithmetic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cam_cli  # noqa: E402
from cam_cli.errors import CamxError  # noqa: E402
from cam_cli.methods import info, method_names  # noqa: E402

SKIP = {"cam"}  # needs a GAP + linear head: refused on other models, run on the ones that have it


def load_images(folder: Path, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rows = []
    for path in files:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        rows.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    x = torch.stack(rows).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--images", type=Path, default=ROOT / "sample_images")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--methods", default=None, help="comma list (default: every method)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = cam_cli.load_model(args.model, args.weights)
    x = load_images(args.images, model.input_size, model.mean, model.std)
    names = args.methods.split(",") if args.methods else [m for m in method_names() if m not in SKIP]
    print(f"{args.model} ({args.weights}), {len(x)} images at {model.input_size}, {args.precision} against fp32")
    print("| method | max abs diff | mean abs diff | lowest correlation | images of another class |")
    print("|---|---|---|---|---|")
    for name in names:
        kwargs = {"methods": name, "batch_size": args.batch_size}
        try:
            full = cam_cli.explain(model, x, precision="fp32", **kwargs)[name]
            low = cam_cli.explain(model, x, precision=args.precision, **kwargs)[name]
        except CamxError as exc:
            print(f"| {name} | refused: {exc} | | | |")
            continue
        a, b = full.maps.flatten(1).double(), low.maps.flatten(1).double()
        diff = (a - b).abs()
        corr = torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(a, b, strict=True)])
        other = int((full.classes != low.classes).any(dim=-1).sum()) if info(name).class_specific else 0
        print(f"| {name} | {diff.max():.4f} | {diff.mean():.4f} | {corr.nan_to_num(1.0).min():.4f} | {other} |")


if __name__ == "__main__":
    main()
