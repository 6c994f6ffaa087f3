"""A CLIP run against its floor: ``camx explain`` with an open_clip model and text prompts,
against the image tower's plain forward pass over the same images (decoded by the same
DataLoader, in batches of the same size, in inference mode).

Both in this one process, after a warm-up of each; the model is built once (random weights,
seeded: nothing can be downloaded here). Prints images per second for both and the ratio
floor / camx (how many times the plain forward pass camx's run costs). Not a test: nothing
here asserts a timing, and on a shared machine the figures are noisy.

    python bench/clip.py --arch ViT-S-32 --images 32 --batch-size 16 --method gradcam
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cam_cli.images import DEFAULT_MAX_PIXELS, discover
from cam_cli.jobs.base import loader
from cam_cli.jobs.data import ImageDataset, collate
from cam_cli.jobs.explain import ExplainConfig, Explainer

LABELS = ["dog", "cat", "car", "tree", "house", "person", "bird", "boat", "plane", "flower"]


def floor(images: Path, explainer: Explainer, batch_size: int, workers: int) -> float:
    """Seconds for the image tower alone over ``images``: decode, normalise, forward."""
    classifier = explainer.classifier
    visual = classifier.module.visual
    found = discover([images])
    dataset = ImageDataset(found, classifier.input_size, DEFAULT_MAX_PIXELS, classifier.interpolation)
    runner = explainer.session.runner
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader(dataset, batch_size, workers, collate):
            visual(runner.normalise(batch.images.to(runner.device)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-S-32")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            small = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(small).resize((480, 320), Image.BILINEAR).save(folder / f"im{i:04d}.jpg", quality=90)
        labels = Path(tmp) / "labels.txt"
        labels.write_text("\n".join(LABELS) + "\n")
        timings: dict[str, list[float]] = {"camx": [], "floor": []}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            config = ExplainConfig(inputs=[folder], out_dir=Path(tmp) / f"out{round_}", method=args.method,
                                   model=f"openclip:{args.arch}", weights="NONE", labels=labels,
                                   batch_size=args.batch_size, workers=args.workers, device=args.device)  # fmt: skip
            explainer = Explainer(config)
            started = time.perf_counter()
            explainer.run()
            camx = time.perf_counter() - started
            plain = floor(folder, explainer, args.batch_size, args.workers)
            if round_:
                timings["camx"].append(camx)
                timings["floor"].append(plain)
    camx, plain = float(np.median(timings["camx"])), float(np.median(timings["floor"]))
    print(f"openclip:{args.arch} {args.method}, {args.images} images, batch {args.batch_size}, {len(LABELS)} prompts")
    print(f"  floor (image tower forward): {args.images / plain:.2f} img/s")
    print(f"  camx explain:                {args.images / camx:.2f} img/s")
    print(f"  camx / floor time:           {camx / plain:.2f}x")


if __name__ == "__main__":
    main()
