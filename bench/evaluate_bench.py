"""``camx evaluate`` against a plain forward floor doing the same number of passes.

Makes its own run first (``camx explain`` over generated JPEGs, not timed), then
times, each in a fresh child process and as a whole process (interpreter start,
imports, model build, decoding and all):

* camx: ``camx evaluate OUT --json`` (deletion, insertion and confidence at
  their defaults: 41 forward passes per image and method);
* floor: the same model built the same way, the same images decoded by the same
  DataLoader, then exactly as many forward passes as camx reported, in batches
  of the same size, in inference mode: what the metrics cost if building the
  perturbed inputs, scheduling them and writing the lines were free.

Prints forward passes per second for both and the ratio camx / floor (the
target is at least 0.9). Rounds alternate camx and floor; medians are shown.
Not a test: nothing here asserts a timing, and on a shared machine the figures
are noisy.

    python bench/evaluate_bench.py --model resnet18 --images 32 --batch-size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

FLOOR = """
import sys, time, json
from pathlib import Path
import torch
from cam_cli.images import DEFAULT_MAX_PIXELS, discover
from cam_cli.jobs.base import loader
from cam_cli.jobs.data import ImageDataset, collate
from cam_cli.device import resolve_device, tune_allocator
from cam_cli.models import load_classifier

images_dir, model_name, device_spec, batch_size, passes, workers = sys.argv[1:7]
batch_size, passes, workers = int(batch_size), int(passes), int(workers)
device = resolve_device(device_spec)
if device.type == "cpu":
    tune_allocator()
classifier = load_classifier(model_name, "NONE")
classifier.module.to(device)
images = discover([Path(images_dir)])
size = classifier.input_size
mean = torch.tensor(classifier.mean, device=device).view(1, 3, 1, 1) * 255
std = torch.tensor(classifier.std, device=device).view(1, 3, 1, 1) * 255
decoded = []
for batch in loader(ImageDataset(images, size, DEFAULT_MAX_PIXELS), 4, workers, collate):
    decoded.append(batch.images.to(device).float().sub_(mean).div_(std))
pool = torch.cat(decoded)
done = 0
with torch.inference_mode():
    while done < passes:
        n = min(batch_size, passes - done)
        index = torch.arange(done, done + n, device=device) % len(pool)
        logits = classifier.logits(pool[index])
        torch.softmax(logits.float(), dim=1)[:, 0].cpu()
        done += n
print(json.dumps({"passes": done}))
"""


def write_images(folder: Path, count: int) -> None:
    """``count`` smooth random JPEGs between 320x240 and 480x360."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = 320 + 16 * (i % 11), 240 + 12 * (i % 11)
        small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / f"img{i:03d}.jpg", quality=90)


def timed(command: list[str]) -> tuple[float, str]:
    seconds, _, stdout = timed_cpu(command)
    return seconds, stdout


def timed_cpu(command: list[str], cwd: Path = ROOT) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system, the child and the processes it waited for:
    a shared machine's load moves them less than the wall clock) and stdout of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command[:4])}...\n{done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision model (built with --weights NONE)")
    parser.add_argument("--images", type=int, default=32, help="generated images")
    parser.add_argument("--batch-size", type=int, default=32, help="forward batch size, for both")
    parser.add_argument("--device", default="cpu", help="camx --device")
    parser.add_argument("--workers", type=int, default=1, help="decoding workers, for both")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (medians shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_images(work / "imgs", args.images)
        out = work / "out"
        explain = [sys.executable, "-m", "cam_cli", "explain", str(work / "imgs"), "-o", str(out)]
        explain += ["--model", args.model, "--weights", "NONE", "--method", "gradcam", "--device", args.device, "-q"]
        timed(explain)
        evaluate = [sys.executable, "-m", "cam_cli", "evaluate", str(out), "--device", args.device, "-q", "--json"]
        evaluate += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        camx_rates, floor_rates, passes = [], [], 0
        for _ in range(args.rounds):
            for name in ("metrics.jsonl", "metrics-summary.json"):
                (out / name).unlink(missing_ok=True)
            seconds, stdout = timed(evaluate)
            passes = json.loads(stdout.strip().splitlines()[-1])["forward_passes"]
            camx_rates.append(passes / seconds)
            floor = [sys.executable, "-c", FLOOR, str(work / "imgs"), args.model, args.device]
            floor += [str(args.batch_size), str(passes), str(args.workers)]
            seconds, _ = timed(floor)
            floor_rates.append(passes / seconds)
        shutil.rmtree(out, ignore_errors=True)
    camx, floor = statistics.median(camx_rates), statistics.median(floor_rates)
    print(
        f"camx evaluate bench: {args.model}, {args.images} images x gradcam, {passes} forward passes, "
        f"batch {args.batch_size}, device {args.device}, {args.rounds} rounds (whole process, medians)"
    )
    print(f"  floor          {floor:8.1f} passes/s   (rounds: {', '.join(f'{r:.1f}' for r in floor_rates)})")
    print(f"  camx evaluate  {camx:8.1f} passes/s   (rounds: {', '.join(f'{r:.1f}' for r in camx_rates)})")
    print(f"  ratio camx / floor: {camx / floor:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
