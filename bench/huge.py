"""Peak resident memory of ``camx explain`` on one huge image, whole process tree.

Generates a WIDTHxHEIGHT JPEG (a sample photo upscaled) unless ``--image`` names
one, runs ``python -m cam_cli explain`` on it in a child process (from this
checkout, or from ``--checkout DIR`` to measure another one, e.g. main) and polls
the resident memory of the child and its descendants (decoding workers) every
few milliseconds from /proc (Linux only). Also prints the kernel's own figure for
the largest single process (``ru_maxrss`` of the children, as ``/usr/bin/time -v``
reports it) and the run's wall and CPU time. Not a test: nothing here asserts anything.

    python bench/huge.py --side 10000 --methods gradcam,layercam
    python bench/huge.py --side 10000 --methods gradcam,layercam --checkout /work/main
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_image(path: Path, side: int) -> None:
    import cv2

    photo = cv2.imread(str(ROOT / "sample_images" / "astronaut.jpg"))
    big = cv2.resize(photo, (side, side), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 90])


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (VmRSS summed)."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as handle:
                total += int(handle.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
        except (OSError, ValueError):
            continue
    return total


def run(command: list[str], env: dict[str, str], cwd: Path, interval: float) -> tuple[int, float, int]:
    """Run ``command`` in ``cwd``; return its exit status, wall seconds and peak tree RSS."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss_bytes(child.pid))
        time.sleep(interval)
    return child.returncode, time.perf_counter() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=10000, help="width and height of the generated JPEG")
    parser.add_argument("--image", type=Path, default=None, help="use this image instead of generating one")
    parser.add_argument("--methods", default="gradcam,layercam")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the camx checkout to run (default: this one)")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between polls")
    parser.add_argument("--keep", type=Path, default=None, help="write the outputs here (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="camx-huge-") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        image = args.image
        if image is None:
            image = folder / f"huge{args.side}.jpg"
            make_image(image, args.side)
        out = (args.keep if args.keep is not None else Path(tmp) / "out").resolve()
        env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve())}
        # run from the checkout: ``-m`` puts the working folder first on the path
        command = [sys.executable, "-m", "cam_cli", "explain", str(image.resolve()), "-o", str(out), "-q"]
        command += ["--model", args.model, "--weights", "NONE", "--method", args.methods, "--format", args.format]
        status, seconds, peak = run(command, env, args.checkout.resolve(), args.interval)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    largest = usage.ru_maxrss * 1024
    print(f"checkout {args.checkout}: exit {status}, {seconds:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s CPU")
    print(f"peak RSS, whole process tree (polled): {peak / 1e9:.2f} GB")
    print(f"peak RSS, largest single process (ru_maxrss): {largest / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
