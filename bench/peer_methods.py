"""Seconds per image of issue 22's methods against their reference library, whole processes.

For each method, camx (``cam_cli.jobs.explain.Explainer``, what the CLI runs) and its
reference (pytorch-grad-cam 1.5.7 or torchcam 0.5.0, run as a user runs it) each run as
one fresh process over A and then B JPEGs at the model's input size, on the same model
(seeded random weights) and images, writing an overlay and a ``.npy`` map per image; the
seconds per image come from the difference, so every tool's start-up cancels (as
``bench/throughput.py --scale`` does for Score-CAM). Not a test: nothing asserts a timing.

    python bench/peer_methods.py --scale 2 4
    python bench/peer_methods.py --scale 2 4 --only sess sscam --noise-samples 4

Models (``--cnn``, ``--small-cnn``, ``--vit``): the gradient and activation methods run on
resnet18 (its ``layer4``; refinecam on ``layer3,layer4``), the methods of many passes
(sess, sscam, iscam) on mobilenet_v3_small (its ``features``), legrad on vit_b_16 (every
block). ``--noise-samples`` lowers sscam's, iscam's and smoothgradcam++'s samples for both
sides alike, so a small run stays short.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402
    ROOT,
    _loader,
    _normalise,
    _write_peer_outputs,
    compare_maps,
    generate_square_images,
    peak_rss_mb,
)

sys.path.insert(0, str(ROOT))

#: method -> (reference library, model flag); the layer is camx's default unless REFINE
METHODS = {
    "kpcacam": ("pgc", "cnn"),
    "segeigencam": ("pgc", "cnn"),
    "refinecam": ("pgc", "cnn"),
    "guided-backprop": ("pgc", "cnn"),
    "guided-gradcam": ("pgc", "cnn"),
    "dff": ("pgc", "cnn"),
    "smoothgradcam++": ("torchcam", "cnn"),
    "sess": ("pgc", "small_cnn"),
    "sscam": ("torchcam", "small_cnn"),
    "iscam": ("torchcam", "small_cnn"),
    "legrad": ("torchcam", "vit"),
}
#: the order they run in: the four the issue asks to be 2x faster first
ORDER = [
    "sess",
    "sscam",
    "iscam",
    "smoothgradcam++",
    "legrad",
    "kpcacam",
    "segeigencam",
    "refinecam",
    "guided-backprop",
    "guided-gradcam",
    "dff",
]
REFINE_LAYERS = "layer3,layer4"
#: methods whose maps follow each ReLU's on/off pattern (guided backpropagation): float rounding that
#: flips one unit moves them, so camx's channels-last kernels (its default on the CPU) alone move them
#: by ~5e-3 from the reference's default-format maps; compared again with camx in the default format
DISCONTINUOUS = ("guided-backprop", "guided-gradcam")


def camx_child(args: argparse.Namespace) -> dict:
    from cam_cli.jobs.explain import ExplainConfig, Explainer

    config = ExplainConfig(
        inputs=[Path(args.dir)],
        out_dir=Path(args.out),
        method=args.method,
        model=args.model,
        weights="NONE",
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        layer=REFINE_LAYERS if args.method == "refinecam" else None,
        noise_samples=args.noise_samples if args.method in ("sscam", "iscam", "smoothgradcam++") else None,
    )
    summary = Explainer(config).run()
    return {"images": summary.done, "seconds": summary.seconds}


def pgc_extractor(method: str, model, layer, batch_size: int):  # noqa: ANN001, ANN201
    """pytorch-grad-cam's class for ``method``, as a user builds it; a callable ``(x, classes) -> maps``."""
    import numpy as np
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def targets(classes: list[int]) -> list:
        return [ClassifierOutputTarget(c) for c in classes]

    if method in ("kpcacam", "segeigencam", "sess", "refinecam"):
        if method == "refinecam":
            cam = pgc.RefineCAM(model, [model.get_submodule(n) for n in REFINE_LAYERS.split(",")])
        elif method == "sess":
            cam = pgc.SESS(model, [layer], batch_size=batch_size)
        else:
            cam = {"kpcacam": pgc.KPCA_CAM, "segeigencam": pgc.SegEigenCAM}[method](model, [layer])
        return lambda x, classes: cam(input_tensor=x, targets=targets(classes))
    if method == "dff":

        def dff(x, classes):  # noqa: ANN001, ANN202, ARG001
            extractor = pgc.DeepFeatureFactorization(model, layer, computation_on_concepts=model.fc)
            return np.concatenate([extractor(x[i : i + 1], 5)[1][0][:1] for i in range(len(x))])

        return dff
    backprop = pgc.GuidedBackpropReLUModel(model, device="cpu")
    gradcam = pgc.GradCAM(model, [layer]) if method == "guided-gradcam" else None

    def guided(x, classes):  # noqa: ANN001, ANN202
        images = np.stack([backprop(x[i : i + 1].clone(), target_category=c) for i, c in enumerate(classes)])
        if gradcam is not None:
            images = images * gradcam(x, targets=targets(classes))[:, :, :, None]
        return np.abs(images).max(axis=-1)

    return guided


def torchcam_extractor(method: str, model, layer_name: str, size: int, args: argparse.Namespace):  # noqa: ANN001, ANN201
    import torch
    import torch.nn.functional as F
    from torchcam import methods as tc

    samples = args.noise_samples
    if method == "legrad":
        cam = tc.LeGrad(model, list(model.encoder.layers))
    elif method == "smoothgradcam++":
        cam = tc.SmoothGradCAMpp(model, layer_name, num_samples=samples or 4, std=0.3, input_shape=(3, size, size))
    elif method == "sscam":
        cam = tc.SSCAM(model, layer_name, batch_size=args.batch_size, num_samples=samples or 35, std=2.0,
                       input_shape=(3, size, size))  # fmt: skip
    else:
        cam = tc.ISCAM(model, layer_name, batch_size=args.batch_size, num_samples=samples or 10,
                       input_shape=(3, size, size))  # fmt: skip
    gradient = method in ("legrad", "smoothgradcam++")

    def run(x, classes):  # noqa: ANN001, ANN202
        with torch.enable_grad() if gradient else torch.no_grad():
            scores = model(x.requires_grad_(method == "legrad"))
        with torch.enable_grad() if gradient else torch.no_grad():
            (maps,) = cam(class_idx=classes, scores=scores)
        up = F.interpolate(maps[:, None].detach().float(), size=(size, size), mode="bilinear", align_corners=False)
        return up[:, 0].numpy()

    return run


def peer_child(args: argparse.Namespace) -> dict:
    import cv2
    import numpy as np
    import torch
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from cam_cli.models import load_classifier
    from cam_cli.probe import default_target, run_probe

    classifier = load_classifier(args.model, "NONE")
    layer_name = default_target(run_probe(classifier)).name
    model = classifier.module.to(args.device)
    for p in model.parameters():  # a plain model, as a user has it
        p.requires_grad_(True)
    loader, images = _loader(args, classifier.input_size)
    size = classifier.input_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    library = METHODS[args.method][0]
    if library == "pgc":
        explain = pgc_extractor(args.method, model, model.get_submodule(layer_name), args.batch_size)
    else:
        explain = torchcam_extractor(args.method, model, layer_name, size, args)
    for batch in loader:
        x = _normalise(batch.images, classifier, args.device)
        with torch.enable_grad() if args.method == "legrad" else torch.no_grad():  # torchcam's hooks want a graph
            classes = model(x).argmax(1).tolist()
        grayscale = explain(x, classes)
        for j, index in enumerate(batch.indices):
            original = batch.originals[j].numpy()
            h, w = original.shape[:2]
            mask = cv2.resize(np.float32(grayscale[j]), (w, h))
            mask = (mask - mask.min()) / max(float(mask.max() - mask.min()), 1e-12)
            overlay = show_cam_on_image(original.astype(np.float32) / 255, mask, use_rgb=False)
            _write_peer_outputs(out, images[index].key, overlay, mask)
    return {"images": len(images), "seconds": time.perf_counter() - started}


def like_for_like(method: str, model: str, args: argparse.Namespace, images: Path, tmp: Path) -> str:
    """camx run again (untimed) over ``images`` in the reference's memory format
    (``CAMX_CHANNELS_LAST=0``), its maps against the reference's of the same images."""
    out = tmp / f"camx-{method}-default-format"
    if run_child("camx", method, model, args, images, out, {"CAMX_CHANNELS_LAST": "0"}) is None:
        return "default format: failed"
    worst, count = compare_maps(out, tmp / f"peer-{method}-{len(list(images.iterdir()))}", method)
    return f"{worst:.1e} ({count}) in the default format" if count else "default format: n/a"


def _load() -> str:
    """The machine's load averages over 1, 5 and 15 minutes (other jobs share the cores)."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def run_child(
    side: str, method: str, model: str, args: argparse.Namespace, images: Path, out: Path, env: dict | None = None
) -> tuple[float, float, float] | None:
    """One whole process: its wall time, the seconds of its own loop over the images and the CPU
    seconds it used (user and system, its threads and children), or None.
    ``env``: variables set for it on top of this process's."""
    command = [sys.executable, __file__, "--child", side, "--method", method, "--model", model, "--dir", str(images),
               "--out", str(out), "--batch-size", str(args.batch_size), "--device", args.device]  # fmt: skip
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.noise_samples is not None:
        command += ["--noise-samples", str(args.noise_samples)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0 or "RESULT " not in run.stdout:
        print(f"  {side} {method}: failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    result = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, float(result["seconds"]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", nargs=2, type=int, metavar=("A", "B"), default=[2, 4])
    parser.add_argument("--only", nargs="*", choices=list(METHODS), help="these methods only (default: all)")
    parser.add_argument("--cnn", default="resnet18")
    parser.add_argument("--small-cnn", default="mobilenet_v3_small")
    parser.add_argument("--vit", default="vit_b_16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--noise-samples", type=int, default=None)
    parser.add_argument("--child", choices=["camx", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.manual_seed(0)
        result = camx_child(args) if args.child == "camx" else peer_child(args)
        print("RESULT " + json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    small, large = sorted(args.scale)
    if small == large:
        raise SystemExit("--scale: give two different folder sizes")
    models = {"cnn": args.cnn, "small_cnn": args.small_cnn, "vit": args.vit}
    print(f"issue 22's methods against their references: whole processes over {small} and {large} JPEGs of 224x224, "
          f"batch {args.batch_size}, device {args.device}, {os.cpu_count()} CPUs, noise samples "
          f"{args.noise_samples or 'the defaults'}; overlays + .npy written; load average {_load()}",
          flush=True)  # fmt: skip
    print()
    print(f"| method | model | reference | camx s/image | reference s/image | camx's speed-up | "
          f"camx {small}/{large} (s) | reference {small}/{large} (s) | in-loop speed-up | "
          "camx CPU s/image | reference CPU s/image | CPU speed-up | maps max abs diff | load average |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="camx-bench-") as tmp:
        folders = {large: Path(tmp) / f"images-{large}", small: Path(tmp) / f"images-{small}"}
        generate_square_images(folders[large], large, 224)
        folders[small].mkdir()
        for path in sorted(folders[large].iterdir())[:small]:
            (folders[small] / path.name).write_bytes(path.read_bytes())
        for method in args.only or ORDER:
            library, flag = METHODS[method]
            model = models[flag]
            walls: dict[str, dict[int, float]] = {}
            loops: dict[str, dict[int, float]] = {}
            cpus: dict[str, dict[int, float]] = {}
            for side in ("camx", "peer"):
                for count in (small, large):
                    out = Path(tmp) / f"{side}-{method}-{count}"
                    timed = run_child(side, method, model, args, folders[count], out)
                    if timed is None:
                        break
                    walls.setdefault(side, {})[count], loops.setdefault(side, {})[count] = timed[:2]
                    cpus.setdefault(side, {})[count] = timed[2]
            if len(walls.get("camx", {})) < 2 or len(walls.get("peer", {})) < 2:
                continue
            per = {side: (w[large] - w[small]) / (large - small) for side, w in walls.items()}
            loop = {side: (w[large] - w[small]) / (large - small) for side, w in loops.items()}
            cpu = {side: (w[large] - w[small]) / (large - small) for side, w in cpus.items()}
            cpu_speedup = f"{cpu['peer'] / cpu['camx']:.1f}x" if cpu["camx"] > 0 else "n/a"
            speedup = f"{per['peer'] / per['camx']:.1f}x" if per["camx"] > 0 else "n/a"
            loop_speedup = f"{loop['peer'] / loop['camx']:.1f}x" if loop["camx"] > 0 else "n/a"
            mine, theirs = Path(tmp) / f"camx-{method}-{large}", Path(tmp) / f"peer-{method}-{large}"
            worst, count = compare_maps(mine, theirs, method)
            diff = f"{worst:.1e} ({count})" if count else "n/a"
            if method in DISCONTINUOUS:
                diff += ", " + like_for_like(method, model, args, folders[small], Path(tmp))
            print(f"| {method} | {model} | {library} | {per['camx']:.2f} | {per['peer']:.2f} | {speedup} | "
                  f"{walls['camx'][small]:.1f}/{walls['camx'][large]:.1f} | "
                  f"{walls['peer'][small]:.1f}/{walls['peer'][large]:.1f} | {loop_speedup} | {cpu['camx']:.2f} | "
                  f"{cpu['peer']:.2f} | {cpu_speedup} | {diff} | {_load()} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
