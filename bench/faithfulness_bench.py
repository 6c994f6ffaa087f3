"""``camx evaluate`` against Quantus 0.6 and against a forward-pass floor, for the
Quantus-style faithfulness metrics (pixel-flipping, irof, region-perturbation,
faithfulness-correlation).

Makes its own run first (``camx explain`` with Grad-CAM over generated JPEGs at
``--input-size``, not timed), then per metric times, each in a fresh child process and
as a whole process (interpreter start, imports, model build, decoding and all):

* camx: ``camx evaluate OUT --metrics M --json`` with the settings below;
* Quantus: the same model (built the same way), the same images decoded the same
  way and the same maps, handed to the Quantus metric with the equivalent settings
  and ``batch_size`` (its batch is images: one model call per step of a batch);
* floor: exactly as many forward passes as camx reported, in batches of the same
  size (``bench/evaluate_bench.py``'s floor).

Prints wall seconds (and CPU seconds, user + system of the process and its workers: a
shared machine's load moves them less), forward passes and the ratios Quantus / camx
(goal: at least 5 for pixel-flipping and irof), in wall and CPU seconds, and camx / floor
in passes per second (goal: at least 0.9).
Not a test: nothing asserts a timing, and on a shared machine the figures are noisy.

    python bench/faithfulness_bench.py --model resnet18 --images 4 --input-size 192
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from evaluate_bench import FLOOR, timed, timed_cpu, write_images

QUANTUS = """
import json, sys, warnings
import numpy as np, torch
import torch.nn.functional as F
warnings.simplefilter("ignore")
if not hasattr(np, "trapz"):
    np.trapz = np.trapezoid  # Quantus 0.6 calls np.trapz, gone from NumPy 2.4
import quantus
from pathlib import Path
from cam_cli import rundir
from cam_cli.images import DEFAULT_MAX_PIXELS, InputImage
from cam_cli.jobs.data import ImageDataset
from cam_cli.models import load_classifier

out, model_name, metric, batch_size, settings = sys.argv[1:6]
batch_size, settings = int(batch_size), json.loads(settings)
records = [r for _, r in sorted(rundir.read_run(Path(out)).records.items()) if r.get("status") == "ok"]
classifier = load_classifier(model_name, "NONE", input_size=int(records[0]["input_size"]))
size = classifier.input_size
mean = torch.tensor(classifier.mean).view(1, 3, 1, 1) * 255
std = torch.tensor(classifier.std).view(1, 3, 1, 1) * 255
images = ImageDataset([InputImage(Path(r["input"]), r["key"]) for r in records], size, DEFAULT_MAX_PIXELS)
x = torch.stack([images[i].image for i in range(len(records))]).float().sub(mean).div(std).numpy()
maps = [torch.from_numpy(np.load(Path(out) / r["map"]))[None, None] for r in records]
a = torch.cat([F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) for m in maps]).numpy()
y = np.array([int(r["class_index"]) for r in records])

class Counted(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module, self.passes = module, 0
    def forward(self, inputs):
        self.passes += int(inputs.shape[0])
        return self.module(inputs)

def by_mask(arr, mask, **kwargs):  # Quantus's IROF mask is (B, 1, H, W): broadcast it over the channels
    return quantus.baseline_replacement_by_mask(arr=arr, mask=np.broadcast_to(mask, arr.shape), **kwargs)

model = Counted(classifier.module).eval()
common = dict(abs=False, normalise=False, disable_warnings=True)
if metric == "pixel-flipping":
    metrics = [quantus.PixelFlipping(features_in_step=3 * settings["flip_step"], perturb_baseline="black",
                                     return_auc_per_sample=True, **common)]
elif metric == "irof":
    metrics = [quantus.IROF(perturb_baseline="mean", perturb_func=by_mask, **common)]
elif metric == "region-perturbation":
    metrics = [quantus.RegionPerturbation(patch_size=settings["patch_size"], regions_evaluation=settings["regions"],
                                          order=order, perturb_baseline="black", **common)
               for order in ("morf", "lerf")]
else:
    metrics = [quantus.FaithfulnessCorrelation(nr_runs=settings["corr_runs"], subset_size=settings["corr_subset"],
                                               perturb_baseline="black", return_aggregate=False, **common)]
for m in metrics:
    m(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu", batch_size=batch_size, softmax=True)
print(json.dumps({"passes": model.passes}))
"""

#: the floor at the run's input size
FLOOR_SIZED = FLOOR.replace(
    'load_classifier(model_name, "NONE")', 'load_classifier(model_name, "NONE", input_size=int(sys.argv[7]))'
)
assert FLOOR_SIZED != FLOOR

SETTINGS = {"flip_step": 256, "patch_size": 8, "regions": 100, "corr_runs": 100, "corr_subset": 224}
OPTIONS = {
    "pixel-flipping": ["--flip-step", str(SETTINGS["flip_step"])],
    "irof": [],
    "region-perturbation": ["--patch-size", str(SETTINGS["patch_size"]), "--regions", str(SETTINGS["regions"])],
    "faithfulness-correlation": ["--corr-runs", str(SETTINGS["corr_runs"]), "--corr-subset", "224"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision model (built with --weights NONE)")
    parser.add_argument("--images", type=int, default=4, help="generated images")
    parser.add_argument("--input-size", type=int, default=192, help="model input size (3 x S^2 / 768 steps)")
    parser.add_argument("--batch-size", type=int, default=32, help="forward batch size, for all three")
    parser.add_argument("--metrics", default=",".join(OPTIONS), help="which metrics")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of each (medians shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_images(work / "imgs", args.images)
        out = work / "out"
        explain = [sys.executable, "-m", "cam_cli", "explain", str(work / "imgs"), "-o", str(out), "--model"]
        explain += [args.model, "--weights", "NONE", "--method", "gradcam", "--input-size", str(args.input_size)]
        timed([*explain, "--device", "cpu", "-q"])
        print(
            f"faithfulness bench: {args.model} at {args.input_size}, {args.images} images x gradcam, "
            f"batch {args.batch_size}, CPU, whole process, medians of {args.rounds}"
        )
        header = ["metric", "camx s (CPU s)", "passes", "Quantus s (CPU s)", "passes", "Quantus / camx"]
        header += ["Quantus / camx CPU", "floor s", "camx / floor"]
        print("| " + " | ".join(header) + " |")
        print("|---|---|---|---|---|---|---|---|---|")
        for metric in args.metrics.split(","):
            row = measure(out, work / "imgs", metric, args)
            print("| " + " | ".join(row) + " |", flush=True)


def measure(out: Path, images: Path, metric: str, args: argparse.Namespace) -> list[str]:
    """One row: camx, Quantus and the floor for ``metric`` (medians over the rounds)."""
    evaluate = [sys.executable, "-m", "cam_cli", "evaluate", str(out), "--metrics", metric, *OPTIONS[metric]]
    evaluate += ["--budget-ok", "--device", "cpu", "-q", "--json", "--batch-size", str(args.batch_size)]
    quantus = [sys.executable, "-c", QUANTUS, str(out), args.model, metric, str(args.batch_size), json.dumps(SETTINGS)]
    camx, quant, floor = [], [], []
    passes = quantus_passes = 0
    for _ in range(args.rounds):
        for name in ("metrics.jsonl", "metrics-summary.json"):
            (out / name).unlink(missing_ok=True)
        seconds, cpu, stdout = timed_cpu(evaluate)
        passes = json.loads(stdout.strip().splitlines()[-1])["forward_passes"]
        camx.append((seconds, cpu))
        seconds, cpu, stdout = timed_cpu(quantus)
        quantus_passes = json.loads(stdout.strip().splitlines()[-1])["passes"]
        quant.append((seconds, cpu))
        command = [sys.executable, "-c", FLOOR_SIZED, str(images), args.model, "cpu", str(args.batch_size)]
        command += [str(passes), "1", str(args.input_size)]
        floor.append(timed(command)[0])
    (c, c_cpu), (q, q_cpu) = _medians(camx), _medians(quant)
    f = statistics.median(floor)
    ratios = [f"{q / c:.2f}", f"{q_cpu / c_cpu:.2f}", f"{f:.1f}", f"{f / c:.2f}"]
    return [metric, f"{c:.1f} ({c_cpu:.1f})", str(passes), f"{q:.1f} ({q_cpu:.1f})", str(quantus_passes), *ratios]


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and CPU seconds of ``(wall, cpu)`` rounds."""
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


if __name__ == "__main__":
    main()
