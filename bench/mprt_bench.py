"""``camx evaluate --metrics mprt`` against Quantus 0.6's ``MPRT`` on the same model,
images and method, each timed as a whole process in a fresh child (interpreter start,
imports, model build, decoding and all).

Makes its own run first (``camx explain`` over the sample photos repeated, not timed),
then times:

* camx: ``camx evaluate OUT --metrics mprt`` (cascading; Spearman and SSIM at every block);
* quantus-blocks: ``quantus.MPRT`` (its default Spearman only) with its layer generator
  yielding camx's blocks (the same randomisations, the same number of explains), the
  maps made by ``cam_cli.explain`` (the same Grad-CAM; one image a call, since each has
  its own target) on the images decoded and resized as camx does;
* quantus-layers: the same, with Quantus's own generator (every module with
  ``reset_parameters``: far more explains); with ``--skip-layers`` left out by default
  because of its cost (``--quantus-layers`` runs it).

Prints seconds per whole process and the ratios. Not a test; on a shared machine the
figures are noisy.

    python bench/mprt_bench.py --model efficientnet_lite0 --images 8
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUANTUS = """
import sys, json
from pathlib import Path
import numpy as np, torch, quantus
import cam_cli
from quantus.helpers.model.pytorch_model import PyTorchModel
from cam_cli import rundir
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.data import ImageDataset
from cam_cli.models import load_classifier
from cam_cli.metrics.randomisation import Randomiser
from cam_cli.probe import resolve_targets, run_probe, resolve_module

out, model_name, weights, mode, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
records = {r["key"]: r for r in rundir.read_records(Path(out) / "manifest.jsonl")}
records = [records[k] for k in sorted(records)]
classifier = load_classifier(model_name, weights)
model = classifier.module.eval().requires_grad_(True)  # pytorch-grad-cam differentiates through it
layer = resolve_module(model, resolve_targets(run_probe(classifier), None)[0].name)
inputs = [InputImage(Path(r["input"]), r["key"]) for r in records]
data = ImageDataset(inputs, classifier.input_size, DEFAULT_MAX_PIXELS)
x = torch.stack([data[i].image for i in range(len(data))]).float() / 255
x = ((x - torch.tensor(classifier.mean).view(1, 3, 1, 1)) / torch.tensor(classifier.std).view(1, 3, 1, 1)).numpy()
y = np.array([r["class_index"] for r in records])


def explain(model, inputs, targets, **_):  # camx's own Grad-CAM, one image at a time (one target each)
    x = torch.as_tensor(inputs)
    maps = [cam_cli.explain(model, x[i : i + 1], "gradcam", target=int(t))["gradcam"] for i, t in enumerate(targets)]
    return torch.cat([m.maps for m in maps])[:, None].numpy()


name_of_layer = next(n for n, m in model.named_modules() if m is layer)
if mode == "blocks":
    import copy
    randomised = copy.deepcopy(model)
    mine = Randomiser(randomised, seed=0)

    def blocks(self, order="top_down", seed=42):
        for depth, name in enumerate(mine.names, 1):
            mine.set_depth(depth)
            yield name, randomised

    PyTorchModel.get_random_layer_generator = blocks
    PyTorchModel.random_layer_generator_length = property(lambda self: len(mine.names))
metric = quantus.MPRT(abs=False, normalise=False, disable_warnings=True)
scores = metric(model=model, x_batch=x, y_batch=y, explain_func=explain, batch_size=batch)
print(json.dumps({"layers": len(scores) - 1}))
"""


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system of the child and what it waited for) and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return seconds, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quantus-layers", action="store_true", help="also time Quantus's own layer generator")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="camx-mprt-bench-"))
    try:
        photos = sorted((ROOT / "sample_images").glob("*.jpg"))
        folder = work / "imgs"
        folder.mkdir()
        for i in range(args.images):
            shutil.copy(photos[i % len(photos)], folder / f"{i:03d}.jpg")
        python = [sys.executable, "-m", "cam_cli"]
        model = ["--model", args.model, "--weights", args.weights]
        explain = [*python, "explain", str(folder), "-o", str(work / "out"), *model, "--method", "gradcam", "-q"]
        timed([*explain, "--device", "cpu"], ROOT)
        evaluate = [*python, "evaluate", str(work / "out"), "--metrics", "mprt", "--device", "cpu", "-q", "--json"]
        evaluate += ["--batch-size", str(args.batch_size)]
        results = {"camx": timed(evaluate, ROOT)[:2]}
        print(f"camx {results['camx'][0]:.1f} s", flush=True)
        quantus = [sys.executable, "-c", QUANTUS, str(work / "out"), args.model, args.weights]
        results["quantus-blocks"] = timed([*quantus, "blocks", str(args.batch_size)], ROOT)[:2]
        if args.quantus_layers:
            seconds, cpu, text = timed([*quantus, "layers", str(args.batch_size)], ROOT)
            results["quantus-layers"] = (seconds, cpu)
            print("quantus layers:", json.loads(text.strip().splitlines()[-1])["layers"])
        reference = results["quantus-blocks"]
        for name, (seconds, cpu) in results.items():
            print(
                f"{name:16s} {seconds:8.1f} s {cpu:8.1f} CPU s   quantus-blocks / it: {reference[0] / seconds:5.2f}"
                f" (CPU {reference[1] / cpu:5.2f})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
