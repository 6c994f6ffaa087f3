"""A detection model over a folder: camx's Grad-CAM (one map per detection) against the
floor (decode + the model's plain forward, inference mode) and pytorch-grad-cam driven as
its detection tutorial does (per image: a forward for the boxes, then ``GradCAM`` with one
target per detection, overlay and map written).

Generates its own PNGs; every pipeline runs in this process one after another, the median
of ``--rounds`` rounds each. Not a test: nothing here asserts a timing.

    python bench/detection.py --images 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cam_cli.images import decode_image  # noqa: E402
from cam_cli.jobs.detect import DetectionRun  # noqa: E402
from cam_cli.jobs.explain import ExplainConfig  # noqa: E402
from cam_cli.methods.detection import matched_scores  # noqa: E402
from cam_cli.models.detection import default_layer, load_detector, lower_threshold  # noqa: E402


def make_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        paths.append(folder / f"im{i:03d}.png")
        Image.fromarray(small).resize((480, 360), Image.BILINEAR).save(paths[-1])
    return paths


def floor(model: str, paths: list[Path], batch: int) -> None:
    module = load_detector(model, "NONE").module
    lower_threshold(module, 0.01)
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            module([torch.from_numpy(decode_image(p)).permute(2, 0, 1).float() / 255 for p in paths[i : i + batch]])


def camx(model: str, folder: Path, out: Path, batch: int) -> None:
    config = ExplainConfig(inputs=[folder], out_dir=out, model=model, weights="NONE", batch_size=batch, workers=0,
                           target="all", min_score=0.01, max_detections=3)  # fmt: skip
    DetectionRun(config).run()


def pgc(model: str, paths: list[Path], out: Path) -> None:
    """pytorch-grad-cam the way its Faster R-CNN tutorial drives it: an image at a time."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    module = load_detector(model, "NONE").module.requires_grad_(True)
    lower_threshold(module, 0.01)
    layer = module.get_submodule(default_layer(module)[0])
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        rgb = decode_image(path)
        x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            found = module(x)[0]
        keep = (found["scores"] >= 0.01).nonzero().flatten()[:3]
        with GradCAM(model=module, target_layers=[layer]) as cam:
            for r, i in enumerate(keep.tolist()):
                box, label = found["boxes"][i : i + 1], found["labels"][i : i + 1]
                grayscale = cam(x, targets=[lambda o, b=box, lab=label: matched_scores(o, b, lab)[0]])[0]
                overlay = show_cam_on_image(rgb.astype(np.float32) / 255, grayscale, use_rgb=False)
                cv2.imwrite(str(out / f"{path.name}.det{r}.jpg"), overlay)
                np.save(out / f"{path.name}.det{r}.npy", grayscale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        paths = make_images(folder, args.images)
        runs = {
            "floor": lambda k: floor(args.model, paths, args.batch_size),
            "camx gradcam": lambda k: camx(args.model, folder, Path(tmp) / f"camx{k}", args.batch_size),
            "pytorch-grad-cam": lambda k: pgc(args.model, paths, Path(tmp) / f"pgc{k}"),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for k in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run(k)
                seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds["floor"])
    print(f"{args.model}, {args.images} images 480x360, batch {args.batch_size}, median of {args.rounds}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<18} {median:7.2f} s  {args.images / median:6.2f} img/s  floor/this {base / median:5.2f}")


if __name__ == "__main__":
    main()
