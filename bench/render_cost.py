"""Where one more method costs per image: the writer's stages, CPU milliseconds each.

For a JPEG of each size, times single-threaded (OpenCV on one thread) the stages a
writer runs per (image, method) on the CPU: upsampling and min-max of a 7x7 raw map,
colouring and blending the overlay, encoding it (JPEG quality 95 or PNG), writing the
``.npy`` map and the overlay file (temporary + rename, as the run does); and, once per
image, decoding the JPEG. CPU time (``time.process_time``) moves much less with other
load on the machine than wall time; medians over ``--repeat`` runs. Not a test.

    python bench/render_cost.py                       # this checkout
    python bench/render_cost.py --checkout /work/main # another one, same stages
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(step: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        step()
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def stages(folder: Path, width: int, height: int, fmt: str, repeat: int) -> dict[str, float]:
    import cv2
    import numpy as np

    from cam_cli import render, rundir
    from cam_cli.images import decode_image
    from cam_cli.jobs.explain.writer import encode

    rng = np.random.default_rng(width * height)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    path = folder / f"in{width}x{height}.jpg"
    cv2.imwrite(str(path), cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))
    image = decode_image(path)
    raw = rng.random((7, 7), dtype=np.float32)
    split = hasattr(render, "overlay_opencv")  # this branch: one map at a time, overlay in strips
    if split:
        norm = render.upsample_normalise_opencv(raw, height, width)
        overlay = render.overlay_opencv(norm, image, 0.4)
    else:
        norms, overlays = render.render_with_opencv(raw[None], image, 0.4)
        norm, overlay = norms[0], overlays[0]
    data = encode(overlay, fmt)

    def upsample() -> object:
        if split:
            return render.upsample_normalise_opencv(raw, height, width)
        return cv2.resize(raw, (width, height), interpolation=cv2.INTER_LINEAR)

    def whole_render() -> object:
        if split:
            out = render.upsample_normalise_opencv(raw, height, width)
            return render.overlay_opencv(out, image, 0.4)
        return render.render_with_opencv(raw[None], image, 0.4)

    def colour() -> object:
        if split:
            return render.overlay_opencv(norm, image, 0.4)
        index = np.multiply(norm, 255.0, dtype=np.float32).astype(np.uint8)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        return cv2.addWeighted(cv2.applyColorMap(index, cv2.COLORMAP_JET), 0.4, bgr, 0.6, 0.0)

    return {
        "decode (per image)": cpu_ms(lambda: decode_image(path), repeat),
        "upsample + min-max": cpu_ms(upsample, repeat),
        "colour + blend": cpu_ms(colour, repeat),
        "render (both, as the writer runs it)": cpu_ms(whole_render, repeat),
        f"encode {fmt}": cpu_ms(lambda: encode(overlay, fmt), repeat),
        "write .npy": cpu_ms(lambda: rundir.write_npy(folder / "m.npy", norm), repeat),
        f"write .{fmt}": cpu_ms(lambda: rundir.write_atomic(folder / f"o.{fmt}", data), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the camx checkout to measure")
    parser.add_argument("--sizes", default="640x480,320x240,1920x1080")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    import cv2

    cv2.setNumThreads(1)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="camx-render-cost-") as tmp:
        table = {f"{w}x{h}": stages(Path(tmp), w, h, args.format, args.repeat) for w, h in sizes}
    load = os.getloadavg()[0]
    print(f"checkout {args.checkout}, CPU ms per image and method (median of {args.repeat}), load {load:.1f}")
    names = list(next(iter(table.values())))
    print("| stage | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{table[size][name]:.2f}" for size in table) + " |")


if __name__ == "__main__":
    main()
