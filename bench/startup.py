"""Fixed per-run cost: camx explaining one image against the floor doing the same
work by hand, whole process (interpreter start, imports, model build, decode,
one forward), in paired runs one after the other. Not a test.

Each pair also times the floor with the garbage collector's objects frozen
after its imports (``gc.freeze()``, as camx does), the floor at its best, and
with ``--baseline DIR`` camx from another checkout (``git worktree add DIR REF``)
in the same rounds, for a before-and-after in one run.

    python bench/startup.py --model resnet50 --method gradcam --pairs 5
"""

from __future__ import annotations

import argparse
import os
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
if len(sys.argv) > 3:
    import gc; gc.freeze()
torch.manual_seed(0)
model = torchvision.models.get_model(sys.argv[1], weights=None).eval()
image = torch.from_numpy(np.array(Image.open(sys.argv[2]).convert("RGB"))).permute(2, 0, 1)
x = TF.resize(image, [224, 224], antialias=True)[None].float().div(255)
with torch.inference_mode():
    print(int(model(x).argmax()))
"""


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    # run from / so that `python -m cam_cli` imports the checkout on PYTHONPATH, not the working directory's
    subprocess.run(command, check=True, capture_output=True, env=env, cwd="/")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a camx checkout to time in the same rounds")
    args = parser.parse_args()
    baseline_env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())} if args.baseline else None
    before: list[float] = []
    camx = str(Path(sys.executable).parent / "camx")
    with tempfile.TemporaryDirectory(prefix="camx-startup-") as tmp:
        image = Path(tmp) / "one.jpg"
        sys.path.insert(0, str(ROOT / "bench"))
        from throughput import generate_images

        generate_images(Path(tmp) / "gen", 1)
        (Path(tmp) / "gen" / "img00000.jpg").rename(image)
        floor_cmd = [sys.executable, "-c", FLOOR, args.model, str(image)]
        frozen_cmd = [*floor_cmd, "freeze"]
        gaps, frozen_gaps, floors, frozens, camxs = [], [], [], [], []
        for i in range(args.pairs + 1):
            out = Path(tmp) / f"out{i}"
            run_args = ["explain", str(image), "--model", args.model, "--weights", "NONE", "--method", args.method,
                        "--device", "cpu", "-q", "-o"]  # fmt: skip
            camx_cmd = [camx, *run_args, str(out)]
            f = timed(floor_cmd)
            c = timed(camx_cmd)
            z = timed(frozen_cmd)
            baseline_cmd = [sys.executable, "-m", "cam_cli", *run_args, f"{out}-baseline"]
            b = timed(baseline_cmd, baseline_env) if baseline_env else None
            if i == 0:
                continue  # warm-up round (page cache)
            floors.append(f)
            frozens.append(z)
            camxs.append(c)
            gaps.append(c - f)
            frozen_gaps.append(c - z)
            if b is not None:
                before.append(b - f)
            was = f", baseline gap {b - f:+.2f} s" if b is not None else ""
            print(f"  pair {i}: floor {f:.2f} s, camx {c:.2f} s, floor gc-frozen {z:.2f} s: gap {c - f:+.2f} s, "
                  f"to the frozen floor {c - z:+.2f} s{was}", flush=True)  # fmt: skip
    print(
        f"{args.model} {args.method}, one image, {args.pairs} pairs: floor {statistics.median(floors):.2f} s, "
        f"camx {statistics.median(camxs):.2f} s, gap median {statistics.median(gaps):+.2f} s "
        f"(range {min(gaps):+.2f}..{max(gaps):+.2f}); floor gc-frozen {statistics.median(frozens):.2f} s, "
        f"gap median {statistics.median(frozen_gaps):+.2f} s (range {min(frozen_gaps):+.2f}..{max(frozen_gaps):+.2f})"
    )
    if before:
        print(f"baseline {args.baseline}: gap median {statistics.median(before):+.2f} s "
              f"(range {min(before):+.2f}..{max(before):+.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
