"""Fixed per-run cost: camx explaining one image against the floor doing the same
work by hand, whole process (interpreter start, imports, model build, decode,
one forward), in paired runs one after the other. Not a test.

    python bench/startup.py --model resnet50 --method gradcam --pairs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOOR = """
import sys
import torch, torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
import numpy as np
torch.manual_seed(0)
model = torchvision.models.get_model(sys.argv[1], weights=None).eval()
image = torch.from_numpy(np.array(Image.open(sys.argv[2]).convert("RGB"))).permute(2, 0, 1)
x = TF.resize(image, [224, 224], antialias=True)[None].float().div(255)
with torch.inference_mode():
    print(int(model(x).argmax()))
"""


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    camx = str(Path(sys.executable).parent / "camx")
    with tempfile.TemporaryDirectory(prefix="camx-startup-") as tmp:
        image = Path(tmp) / "one.jpg"
        sys.path.insert(0, str(ROOT / "bench"))
        from throughput import generate_images

        generate_images(Path(tmp) / "gen", 1)
        (Path(tmp) / "gen" / "img00000.jpg").rename(image)
        floor_cmd = [sys.executable, "-c", FLOOR, args.model, str(image)]
        gaps, floors, camxs = [], [], []
        for i in range(args.pairs + 1):
            out = Path(tmp) / f"out{i}"
            camx_cmd = [camx, "explain", str(image), "-o", str(out), "--model", args.model, "--weights", "NONE",
                        "--method", args.method, "--device", "cpu", "-q"]  # fmt: skip
            f = timed(floor_cmd)
            c = timed(camx_cmd)
            if i == 0:
                continue  # warm-up pair (page cache)
            floors.append(f)
            camxs.append(c)
            gaps.append(c - f)
            print(f"  pair {i}: floor {f:.2f} s, camx {c:.2f} s, gap {c - f:+.2f} s", flush=True)
    print(
        f"{args.model} {args.method}, one image, {args.pairs} pairs: floor {statistics.median(floors):.2f} s, "
        f"camx {statistics.median(camxs):.2f} s, gap median {statistics.median(gaps):+.2f} s "
        f"(range {min(gaps):+.2f}..{max(gaps):+.2f})"
    )


if __name__ == "__main__":
    main()
