"""Where a segmentation or detection Grad-CAM batch's time goes, in one process: the floor's
forward (inference mode), camx's forward with the graph from the target layer on, and the
backward pass(es) from the targets to the layer, before and after camx's two shortcuts, with
the gradients compared (they should agree to float rounding):

* segmentation: autograd through the model's final bilinear upsample of every class (before)
  against the region sums differentiated from the low-resolution logits for the explained
  class only (``cam_cli.models.segmentation._UpsampledRegionSums``);
* detection: autograd through the whole R-CNN box branch (before) against the rows of the
  explained detections only (``cam_cli.methods.box_gradients``), ``--ranks`` backward passes.

Seeded random weights (detectors calibrated as ``bench/detection.py`` does). Milliseconds per
image; not a test.

    python bench/backward_split.py seg lraspp_mobilenet_v3_large --images 4
    python bench/backward_split.py det fasterrcnn_mobilenet_v3_large_320_fpn --images 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cam_cli.jobs.base import place_model  # noqa: E402
from cam_cli.methods import box_gradients  # noqa: E402
from cam_cli.methods.base import TargetLayer  # noqa: E402
from cam_cli.models import load_classifier  # noqa: E402
from cam_cli.models.detection import default_layer, load_detector, lower_threshold  # noqa: E402
from cam_cli.models.readout import Readout  # noqa: E402
from cam_cli.models.segmentation import RegionReadout  # noqa: E402
from cam_cli.probe.capture import ActivationCapture  # noqa: E402


def clock(run):  # noqa: ANN001, ANN201
    started = time.perf_counter()
    found = run()
    return time.perf_counter() - started, found


def segmentation(model: str, n: int, rounds: int) -> None:
    c = load_classifier(model, "NONE")
    layer = f"backbone.{[k for k, _ in c.module.backbone.named_children()][-1]}"
    runner = place_model(c.module, c.logits, c.mean, c.std, torch.device("cpu"), "fp32", True)
    pixels = torch.rand(n, 3, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0)) * 255
    x = runner.normalise(pixels)
    shortcut = RegionReadout.read

    def floor() -> None:
        with torch.inference_mode():
            c.module(x)["out"].argmax(1)

    def camx(after: bool) -> tuple[float, float, torch.Tensor]:
        RegionReadout.read = shortcut if after else Readout.read  # type: ignore[method-assign]
        with torch.enable_grad(), ActivationCapture(c.module, TargetLayer(layer), True) as hooked:
            forward, targets = clock(lambda: runner.forward(x))
            score = targets.gather(1, c.readout.ranking(targets).argmax(1)[:, None]).sum()
            backward, (grad,) = clock(lambda: torch.autograd.grad(score, hooked.activation))
        return forward, backward, grad

    floor()
    for _ in range(rounds):
        base, _ = clock(floor)
        fb, bb, before = camx(False)
        fa, ba, after = camx(True)
        diff = float((after - before).abs().max()) / float(before.abs().max())
        print(f"{model} {c.input_size}px, batch {n}, layer {layer}, ms/image: floor forward {1000 * base / n:.0f}; "
              f"before: forward {1000 * fb / n:.0f} backward {1000 * bb / n:.0f}; after: forward {1000 * fa / n:.0f} "
              f"backward {1000 * ba / n:.0f}; gradients differ by {diff:.1e} of their largest", flush=True)  # fmt: skip
    RegionReadout.read = shortcut  # type: ignore[method-assign]


def detection(model: str, n: int, rounds: int, ranks: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from detection import MIN_SCORE, calibrated_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        calibrated_checkpoint(model, Path(tmp) / "c.pt")
        module = load_detector(model, str(Path(tmp) / "c.pt")).module
    lower_threshold(module, float(MIN_SCORE))
    layer = default_layer(module)[0]
    generator = torch.Generator().manual_seed(0)
    images = [torch.nn.functional.interpolate(torch.rand(1, 3, 36, 48, generator=generator), size=(360, 480),
                                              mode="bilinear")[0] for _ in range(n)]  # fmt: skip

    def floor() -> None:
        with torch.inference_mode():
            module(images)

    def camx(sparse: bool) -> tuple[float, float, list[torch.Tensor]]:
        context = box_gradients.sparse_box_gradients(module, layer) if sparse else contextlib.nullcontext()
        with torch.enable_grad(), context, ActivationCapture(module, TargetLayer(layer), True) as hooked:
            forward, outputs = clock(lambda: module(images))
            count = min(ranks, *(len(o["scores"]) for o in outputs))

            def backward() -> list[torch.Tensor]:
                scores = [sum(o["scores"][r] for o in outputs) for r in range(count)]
                return [torch.autograd.grad(s, hooked.activation, retain_graph=True)[0] for s in scores]

            seconds, grads = clock(backward)
        return forward, seconds, grads

    floor()
    for _ in range(rounds):
        base, _ = clock(floor)
        fb, bb, before = camx(False)
        fa, ba, after = camx(True)
        diff = max(float((a - b).abs().max()) / float(b.abs().max()) for a, b in zip(after, before, strict=True))
        print(f"{model}, {n} images 480x360, layer {layer}, {len(before)} ranks, ms/image: floor forward "
              f"{1000 * base / n:.0f}; before: forward {1000 * fb / n:.0f} backward {1000 * bb / n:.0f}; after: "
              f"forward {1000 * fa / n:.0f} backward {1000 * ba / n:.0f}; gradients differ by {diff:.1e} of their "
              "largest", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["seg", "det"])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=3, help="det: detections explained an image")
    args = parser.parse_args()
    if args.task == "seg":
        segmentation(args.model, args.images, args.rounds)
    else:
        detection(args.model, args.images, args.rounds, args.ranks)


if __name__ == "__main__":
    main()
