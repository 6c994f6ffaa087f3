"""A detection model over a folder: camx's Grad-CAM (one map per detection) against the
floor (decode + the model's plain forward, inference mode) and pytorch-grad-cam driven as
its detection tutorial does (per image: a forward for the boxes, then ``GradCAM`` with one
target per detection, overlay and map written).

Generates its own PNGs; each pipeline is a whole fresh process (camx: ``python -m cam_cli
explain``), the three one after another in each of ``--rounds`` rounds; wall and CPU seconds,
the ratios to the floor of the same round (medians) and the load average beside them
(``bench/processes.py``). Seeded random weights, made usable as ``tests/test_detection_parity.py``
makes them (BatchNorm statistics from noise, class weights scaled, saved as a checkpoint every
pipeline loads): a raw random detector scores every proposal and class about 1/91, so with any
threshold low enough to report boxes its NMS sorts ~90,000 candidates an image and takes most
of the time. Not a test: nothing here asserts a timing.

    python bench/detection.py --model fasterrcnn_mobilenet_v3_large_fpn --images 64 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from processes import Rounds  # noqa: E402

from cam_cli.images import decode_image  # noqa: E402
from cam_cli.methods.detection import matched_scores  # noqa: E402
from cam_cli.models.detection import default_layer, load_detector, lower_threshold  # noqa: E402

MIN_SCORE = "0.05"  # torchvision's own box_score_thresh for Faster R-CNN


def calibrated_checkpoint(model: str, path: Path, scale: float = 5.0) -> None:
    """The seeded random model with BatchNorm statistics from two noise images and its
    class weights scaled by ``scale`` (so that scores spread), saved to ``path``."""
    module = load_detector(model, "NONE", seed=0).module
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module([torch.rand(3, 360, 480, generator=generator) for _ in range(2)])
        for key, parameter in module.named_parameters():
            if "cls_score" in key or "classification_head" in key:
                parameter.mul_(scale)
    torch.save(module.state_dict(), path)


def make_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        paths.append(folder / f"im{i:03d}.png")
        Image.fromarray(small).resize((480, 360), Image.BILINEAR).save(paths[-1])
    return paths


def floor(model: str, weights: str, paths: list[Path], batch: int) -> None:
    module = load_detector(model, weights).module
    lower_threshold(module, float(MIN_SCORE))
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            module([torch.from_numpy(decode_image(p)).permute(2, 0, 1).float() / 255 for p in paths[i : i + batch]])


def pgc(model: str, weights: str, paths: list[Path], out: Path, detections: int) -> None:
    """pytorch-grad-cam the way its Faster R-CNN tutorial drives it: an image at a time."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    module = load_detector(model, weights).module.requires_grad_(True)
    lower_threshold(module, float(MIN_SCORE))
    layer = module.get_submodule(default_layer(module)[0])
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        rgb = decode_image(path)
        x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            found = module(x)[0]
        keep = (found["scores"] >= float(MIN_SCORE)).nonzero().flatten()[:detections]
        with GradCAM(model=module, target_layers=[layer]) as cam:
            for r, i in enumerate(keep.tolist()):
                box, label = found["boxes"][i : i + 1], found["labels"][i : i + 1]
                grayscale = cam(x, targets=[lambda o, b=box, lab=label: matched_scores(o, b, lab)[0]])[0]
                overlay = show_cam_on_image(rgb.astype(np.float32) / 255, grayscale, use_rgb=False)
                cv2.imwrite(str(out / f"{path.name}.det{r}.jpg"), overlay)
                np.save(out / f"{path.name}.det{r}.npy", grayscale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_fpn")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--detections", type=int, default=3, help="maps per image (--max-detections)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a camx checkout: camx from it too, in the same rounds")
    parser.add_argument("--child", choices=["floor", "pgc"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        paths = sorted(args.dir.glob("*.png"))
        if args.child == "floor":
            floor(args.model, args.weights, paths, args.batch_size)
        else:
            pgc(args.model, args.weights, paths, args.out, args.detections)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        make_images(folder, args.images)
        weights = Path(tmp) / "calibrated.pt"
        calibrated_checkpoint(args.model, weights)
        python, here = sys.executable, str(Path(__file__).resolve())
        common = ["--model", args.model, "--batch-size", str(args.batch_size), "--detections", str(args.detections),
                  "--dir", str(folder), "--weights", str(weights)]  # fmt: skip
        rounds = Rounds(args.images)
        rounds.run(args.rounds, {
            "floor": lambda k: [python, here, "--child", "floor", *common],
            "camx gradcam": lambda k: [python, "-m", "cam_cli", "explain", str(folder), "--model", args.model,
                                       "--weights", str(weights), "--min-score", MIN_SCORE, "--max-detections",
                                       str(args.detections), "--batch-size", str(args.batch_size),
                                       "--method", "gradcam", "-q", "-o", str(Path(tmp) / f"camx{k}")],
            "pgc gradcam": lambda k: [python, here, "--child", "pgc", *common, "--out", str(Path(tmp) / f"pgc{k}")],
        }, args.baseline)  # fmt: skip
    print(f"{args.model}, {args.images} images 480x360, batch {args.batch_size}, {args.detections} maps an image, "
          f"whole processes, median of {args.rounds} rounds")  # fmt: skip
    print(rounds.table())


if __name__ == "__main__":
    main()
