"""Maps computed on another device against the CPU's, image by image.

Explains ``sample_images`` on the CPU (fp32) and on DEVICE at each precision
and prints the largest absolute difference of the normalised ``.npy`` maps for
CAM and Grad-CAM. The model is efficientnet_lite0 with its real ImageNet
weights (the demo extra; random weights exaggerate reduced-precision error),
or with ``--model resnet50`` one seeded random state dict used on both sides.

    python bench/compare_devices.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cam_cli.jobs.explain import ExplainConfig, Explainer  # noqa: E402


def run(model: str, weights: str, out: Path, method: str, device: str, precision: str) -> dict[str, np.ndarray]:
    config = ExplainConfig(
        inputs=[ROOT / "sample_images"],
        out_dir=out,
        method=method,
        model=model,
        weights=weights,
        device=device,
        precision=precision,
        batch_size=8,
        workers=2,
    )
    summary = Explainer(config).run()
    assert summary.failed == 0, summary.failures
    return {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet50"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = "DEFAULT"
        if args.model == "resnet50":
            weights = str(Path(tmp) / "resnet50-seeded.pth")
            torch.manual_seed(0)
            torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
        for method in ("cam", "gradcam"):
            reference = run(args.model, weights, Path(tmp) / f"cpu-{method}", method, "cpu", "fp32")
            for precision in args.precisions:
                maps = run(
                    args.model,
                    weights,
                    Path(tmp) / f"{args.device}-{method}-{precision}",
                    method,
                    args.device,
                    precision,
                )
                worst = max(float(np.abs(maps[k] - reference[k]).max()) for k in reference)
                print(f"{method:8s} {args.device} {precision}: max |map - cpu fp32 map| = {worst:.2e}", end=" ")
                print(f"over {len(reference)} images")


if __name__ == "__main__":
    main()
