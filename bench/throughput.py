"""Throughput of camx against the forward-only floor and the peers, in one run.

Generates its own JPEGs (sizes between 320x240 and 640x480), then runs each
pipeline over the same images in a fresh child process (so each has its own
peak RSS and allocator state), one after another on this machine:

* floor (default malloc): decode + resize (the same DataLoader camx uses) +
  a plain forward pass in inference mode, glibc's default allocator settings;
* floor: the same with the allocator tuned (what camx does on its own);
* camx CAM and camx Grad-CAM end to end through ``cam_cli.jobs.explain.Explainer``
  (the code the CLI runs), overlays and .npy maps written;
* pytorch-grad-cam GradCAM and torchcam GradCAM / CAM end to end, when
  installed, writing the same outputs (JPEG overlay + .npy map per image).

Every pipeline runs twice: a warm-up pass, then the measured pass. Each pass
writes into a folder of its own, so the measured pass creates its files as a
first run over a data set does (replacing existing files costs more on ext4,
which flushes replaced files' data at rename or truncate).

Prints images/s, the ratio to the (tuned) floor, peak RSS and where camx's
time goes. Not a test: nothing here asserts a timing.

    python bench/throughput.py --model resnet50 --images 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the checkout camx is imported from: this one, or --baseline's in its children
sys.path.insert(0, os.environ.get("CAMX_BENCH_CHECKOUT", str(ROOT)))

#: the gradient methods that share one backward pass (``camx-seven`` runs them together)
SEVEN = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam"]
DEFAULT = [
    "floor-default-malloc",
    "floor",
    "camx-cam",
    "camx-gradcam",
    "pgc-gradcam",
    "torchcam-gradcam",
    "torchcam-cam",
]
PIPELINES = [
    *DEFAULT,
    "floor-channels-last",
    "camx-gradcam-nchw",
    "camx-cam-nchw",
    *(f"camx-{m}" for m in SEVEN[1:]),
    "camx-shapleycam",
    "camx-finercam",
    "camx-eigencam",
    "camx-seven",
]
#: the perturbation methods against their peers (``--scale A B``: whole processes, two folder sizes)
PERTURBATION = ["camx-scorecam", "pgc-scorecam", "torchcam-scorecam", "camx-ablationcam", "pgc-ablationcam"]
PIPELINES += PERTURBATION


def generate_images(folder: Path, count: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width = int(rng.integers(320, 641))
        height = int(rng.integers(240, 481))
        small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        image.save(folder / f"img{i:05d}.jpg", quality=90)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ children


def _loader(args: argparse.Namespace, size: int):
    from torch.utils.data import DataLoader

    from cam_cli import images as camx_images
    from cam_cli.jobs.base import default_workers
    from cam_cli.jobs.data import ImageDataset, collate

    images = camx_images.discover([Path(args.dir)])
    workers = default_workers() if args.workers is None else args.workers
    return DataLoader(
        ImageDataset(images, size, camx_images.DEFAULT_MAX_PIXELS),
        batch_size=args.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=args.device.startswith("cuda"),
        prefetch_factor=2 if workers else None,
    ), images


def _model(args: argparse.Namespace):
    from cam_cli.models import load_classifier

    classifier = load_classifier(args.model, "NONE")
    return classifier, classifier.module.to(args.device)


_CONSTANTS: dict = {}


def _normalise(images, classifier, device):
    """(x - mean) / std on ``device``, the constants built once, as camx does."""
    import torch

    key = (id(classifier), device)
    if key not in _CONSTANTS:
        mean = torch.tensor(classifier.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(classifier.std, device=device).view(1, 3, 1, 1) * 255
        _CONSTANTS[key] = (mean, std)
    mean, std = _CONSTANTS[key]
    return images.to(device, non_blocking=True).float().sub_(mean).div_(std)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_floor(args: argparse.Namespace, tuned: bool, channels_last: bool = False) -> dict:
    import torch

    from cam_cli.device import PRECISIONS, tune_allocator, use_ieee_fp32

    cuda = args.device.startswith("cuda")
    if tuned and not cuda:  # as camx does: the allocator matters where activations live in host memory
        tune_allocator()
    if cuda:
        use_ieee_fp32()  # as camx does: fp32 means fp32, not TF32
    classifier, module = _model(args)
    channels_last = channels_last or cuda
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    dtype = PRECISIONS[args.precision]
    loader, images = _loader(args, classifier.input_size)

    def run() -> tuple[float, float]:
        waited = 0.0
        started = time.perf_counter()
        batches = iter(loader)
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t
            if batch is None:
                break
            with (
                torch.inference_mode(),
                torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None),
            ):
                x = _normalise(batch.images, classifier, args.device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = module(x)
                logits.float().softmax(1).max(1).indices.cpu()
        _sync(args.device)
        return time.perf_counter() - started, waited

    if args.once:  # whole-process mode (bench/steady.py): one pass, timed whole by the parent
        seconds, waited = run()
        return {"images": len(images), "seconds": seconds, "timings": {"wait_for_data": waited}}
    run()  # warm-up pass (kernel selection, page cache)
    cpu = cpu_seconds()
    seconds, waited = run()
    return {"images": len(images), "seconds": seconds, "cpu": cpu_seconds() - cpu, "timings": {"wait_for_data": waited}}


def cpu_seconds() -> float:
    """CPU time of this process (all its threads, user and kernel) and of its reaped children
    (the decoding workers, joined at the end of each pass): the work a pass costs, which
    other load on the machine changes much less than its wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def child_camx(args: argparse.Namespace, method: str) -> dict:
    if method.endswith("-nchw"):  # camx with channels-last turned off, to compare
        os.environ["CAMX_CHANNELS_LAST"] = "0"
        method = method[: -len("-nchw")]
    try:
        from cam_cli.jobs.explain import ExplainConfig, Explainer
    except ImportError:  # a --baseline checkout from before the restructure
        from cam_cli.pipeline import ExplainConfig, Explainer  # type: ignore[no-redef]

    def config(out: Path) -> ExplainConfig:
        return ExplainConfig(
            inputs=[Path(args.dir)],
            out_dir=out,
            method=",".join(SEVEN) if method == "seven" else method,
            model=args.model,
            weights="NONE",
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
        )

    if args.once:  # --scale: one pass in a fresh process, timed whole by the parent
        summary = Explainer(config(Path(args.out) / method)).run()
        return {"images": summary.done, "seconds": summary.seconds, "timings": summary.timings}
    Explainer(config(Path(args.out) / f"{method}-warmup")).run()  # warm-up pass, as for the floor
    explainer = Explainer(config(Path(args.out) / method))
    cpu = cpu_seconds()
    summary = explainer.run()
    cpu = cpu_seconds() - cpu
    return {"images": summary.done, "seconds": summary.seconds, "cpu": cpu, "timings": summary.timings}


def _write_peer_outputs(out: Path, name: str, overlay_bgr, cam) -> None:
    import cv2
    import numpy as np

    cv2.imwrite(str(out / f"{name}.jpg"), overlay_bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    np.save(out / f"{name}.npy", cam.astype(np.float32))


def child_pgc(args: argparse.Namespace) -> dict:
    import cv2
    import numpy as np
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cam_cli.models import load_classifier

    classifier = load_classifier(args.model, "NONE")
    model = classifier.module.to(args.device)
    for p in model.parameters():  # as a user of pytorch-grad-cam has it: a plain model
        p.requires_grad_(True)
    layer = model.get_submodule("layer4") if hasattr(model, "layer4") else model.features
    loader, images = _loader(args, classifier.input_size)
    del torchvision

    def run(out: Path) -> float:
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for batch in loader:
                x = _normalise(batch.images, classifier, args.device)
                with __import__("torch").no_grad():
                    classes = model(x).argmax(1).tolist()
                grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
                for j, index in enumerate(batch.indices):
                    original = batch.originals[j].numpy()
                    h, w = original.shape[:2]
                    mask = cv2.resize(grayscale[j], (w, h))
                    overlay = show_cam_on_image(original.astype(np.float32) / 255, mask, use_rgb=False)
                    _write_peer_outputs(out, images[index].key, overlay, mask)
        return time.perf_counter() - started

    run(Path(args.out) / "pgc-warmup")
    return {"images": len(images), "seconds": run(Path(args.out) / "pgc"), "timings": {}}


def child_torchcam(args: argparse.Namespace, method: str) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchcam.methods import CAM, GradCAM
    from torchcam.utils import overlay_mask
    from torchvision.transforms.functional import to_pil_image

    from cam_cli.models import load_classifier

    classifier = load_classifier(args.model, "NONE")
    model = classifier.module.to(args.device)
    for p in model.parameters():
        p.requires_grad_(True)
    loader, images = _loader(args, classifier.input_size)
    size = classifier.input_size

    def run(out: Path) -> float:
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        extractor_cls = CAM if method == "cam" else GradCAM
        with extractor_cls(model, input_shape=(3, size, size)) as extractor:
            for batch in loader:
                x = _normalise(batch.images, classifier, args.device)
                if method == "cam":
                    with torch.no_grad():
                        scores = model(x)
                else:
                    scores = model(x)
                classes = scores.argmax(1).tolist()
                (cams,) = extractor(class_idx=classes, scores=scores)
                for j, index in enumerate(batch.indices):
                    original = batch.originals[j].numpy()
                    h, w = original.shape[:2]
                    up = F.interpolate(cams[j][None, None].float(), size=(h, w), mode="bilinear")[0, 0]
                    overlay = overlay_mask(
                        Image.fromarray(original), to_pil_image(cams[j].float(), mode="F"), alpha=0.6
                    )
                    overlay.save(out / f"{images[index].key}.jpg", quality=95)
                    np.save(out / f"{images[index].key}.npy", up.cpu().numpy())
        return time.perf_counter() - started

    run(Path(args.out) / f"torchcam-{method}-warmup")
    return {"images": len(images), "seconds": run(Path(args.out) / f"torchcam-{method}"), "timings": {}}


def child_perturbation_peer(args: argparse.Namespace, name: str) -> dict:
    """pytorch-grad-cam's ScoreCAM / AblationCAM or torchcam's ScoreCAM as a user runs them, on
    ``--layer`` (camx's default layer), writing the same outputs as camx (overlay + .npy)."""
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from cam_cli.models import load_classifier

    classifier = load_classifier(args.model, "NONE")
    model = classifier.module.to(args.device)
    for p in model.parameters():  # a plain model, as a user has it
        p.requires_grad_(True)
    loader, images = _loader(args, classifier.input_size)
    size = classifier.input_size
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if name.startswith("pgc-"):
        from pytorch_grad_cam import AblationCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = ScoreCAM if name == "pgc-scorecam" else AblationCAM
        extractor = cls(model=model, target_layers=[model.get_submodule(args.layer)])
    else:
        from torchcam.methods import ScoreCAM as TorchcamScoreCAM

        extractor = TorchcamScoreCAM(model, args.layer, batch_size=args.batch_size, input_shape=(3, size, size))
    with extractor:
        for batch in loader:
            x = _normalise(batch.images, classifier, args.device)
            with torch.inference_mode() if name.startswith("torchcam") else torch.no_grad():
                scores = model(x)
            classes = scores.argmax(1).tolist()
            if name.startswith("pgc-"):
                grayscale = extractor(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
            else:
                with torch.inference_mode():
                    (cams,) = extractor(class_idx=classes)
                up = F.interpolate(cams[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
                grayscale = up[:, 0].cpu().numpy()
            for j, index in enumerate(batch.indices):
                original = batch.originals[j].numpy()
                h, w = original.shape[:2]
                mask = cv2.resize(grayscale[j], (w, h))
                overlay = show_cam_on_image(original.astype(np.float32) / 255, mask, use_rgb=False)
                _write_peer_outputs(out, images[index].key, overlay, mask)
    return {"images": len(images), "seconds": time.perf_counter() - started, "timings": {}}


def child_main(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    name = args.child
    if name == "floor-default-malloc":
        result = child_floor(args, tuned=False)
    elif name == "floor":
        result = child_floor(args, tuned=True)
    elif name == "floor-channels-last":
        result = child_floor(args, tuned=True, channels_last=True)
    elif name.startswith("camx-"):
        result = child_camx(args, name.split("-", 1)[1])
    elif name in PERTURBATION:
        result = child_perturbation_peer(args, name)
    elif name == "pgc-gradcam":
        result = child_pgc(args)
    else:
        result = child_torchcam(args, name.split("-", 1)[1])
    result["peak_rss_mb"] = peak_rss_mb()
    result["camx_from"] = str(Path(sys.modules["cam_cli"].__file__).parent.parent) if "cam_cli" in sys.modules else None
    print("RESULT " + json.dumps(result))


# -------------------------------------------------------------------- parent


def available(name: str) -> bool:
    module = {"pgc": "pytorch_grad_cam", "torchcam": "torchcam"}.get(name.split("-")[0])
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def is_peer(name: str) -> bool:
    return name.split("-")[0] in ("pgc", "torchcam")


BASELINE = "baseline:"


def run_child(name: str, args: argparse.Namespace, images: Path, out: Path) -> dict | None:
    env = None
    if name.startswith(BASELINE):  # the same pipeline with camx imported from the --baseline checkout
        name = name[len(BASELINE) :]
        env = {**os.environ, "CAMX_BENCH_CHECKOUT": str(args.baseline.resolve())}
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--dir",
        str(images),
        "--out",
        str(out),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if getattr(args, "layer", None):
        command += ["--layer", args.layer]
    if getattr(args, "layer", None) or getattr(args, "whole_process", False):
        command += ["--once"]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        print(f"  {name}: failed: {run.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the floor and camx pipelines, each round one after another; medians are reported "
        "(peers run in the first round only)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=PIPELINES,
        help="run only these pipelines (default: floors, camx CAM and Grad-CAM, the peers; also: "
        "floor-channels-last, camx-METHOD for each gradient method, camx-seven = the seven one-backward methods)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip pytorch-grad-cam and torchcam")
    parser.add_argument(
        "--scale",
        nargs=2,
        type=int,
        metavar=("A", "B"),
        help="whole-process mode (Score-CAM, Ablation-CAM): run each pipeline (default: "
        + ", ".join(PERTURBATION)
        + ") as one fresh process over A and then B images at the model's input size, and report the "
        "seconds per image from the difference, so that every tool's start-up cancels; maps compared",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a camx checkout (`git worktree add DIR REF`): each camx pipeline also runs with camx from it, "
        "in the same rounds, for a before-and-after in one run",
    )
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--layer", help=argparse.SUPPRESS)
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.scale:
        run_scale(args)
        return

    chosen = args.only or [p for p in DEFAULT if not (args.no_peers and is_peer(p))]
    chosen = [name for name in chosen if available(name) or print(f"  {name}: not installed, skipped")]
    if args.baseline:
        chosen = [n for name in chosen for n in ([name, BASELINE + name] if name.startswith("camx") else [name])]
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    ratios: dict[str, list[float]] = {name: [] for name in chosen}
    cl_ratios: dict[str, list[float]] = {}  # against the channels-last floor, when it runs
    with tempfile.TemporaryDirectory(prefix="camx-bench-") as tmp:
        images = Path(tmp) / "images"
        generate_images(images, args.images)
        print(
            f"camx throughput: {args.model}, {args.images} JPEGs 320x240..640x480, batch {args.batch_size}, "
            f"device {args.device}, {args.precision}, {os.cpu_count()} CPUs, {args.rounds} round(s); "
            "overlays + .npy written",
            flush=True,
        )
        for round_ in range(1, args.rounds + 1):
            this_round: dict[str, float] = {}
            for name in chosen:
                if round_ > 1 and is_peer(name):
                    continue
                out = Path(tmp) / f"out-{round_}-{name}"
                r = run_child(name, args, images, out)
                shutil.rmtree(out, ignore_errors=True)
                if r is None:
                    continue
                r["rate"] = this_round[name] = r["images"] / r["seconds"]
                results[name].append(r)
            floor_rate = this_round.get("floor")
            cl_rate = this_round.get("floor-channels-last")
            line = []
            for name, rate in this_round.items():
                if floor_rate:  # each ratio against the floor of the same round
                    ratios[name].append(rate / floor_rate)
                if cl_rate:
                    cl_ratios.setdefault(name, []).append(rate / cl_rate)
                line.append(f"{name} {rate:.2f}" + (f" ({rate / floor_rate:.2f})" if floor_rate else ""))
            print(f"  round {round_}: " + ", ".join(line), flush=True)

    floor_runs = results.get("floor") or []
    floor_rss = statistics.median(r["peak_rss_mb"] for r in floor_runs) if floor_runs else float("nan")
    floor_cpu = _cpu_per_image(floor_runs)
    print()
    cl = " ratio to channels-last floor |" if cl_ratios else ""
    print(
        f"| pipeline | images/s (median) | ratio to floor (median, range) |{cl} CPU s/image (median) "
        "| floor's CPU / this CPU | peak RSS (MB) | ratio RSS |"
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if cl_ratios else ""))
    for name, runs in results.items():
        if not runs:
            continue
        rate = statistics.median(r["rate"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        found = ratios[name]
        if found:
            spread = f" ({min(found):.2f}..{max(found):.2f})" if len(found) > 1 else ""
            ratio = f"{statistics.median(found):.2f}{spread}"
        else:
            ratio = "n/a"
        extra = ""
        if cl_ratios:
            found_cl = cl_ratios.get(name, [])
            extra = f" {statistics.median(found_cl):.2f} |" if found_cl else " n/a |"
        cpu = _cpu_per_image(runs)
        cpu_cells = f" {cpu:.3f} | {floor_cpu / cpu:.2f} |" if cpu == cpu and floor_cpu == floor_cpu else " n/a | n/a |"
        print(f"| {name} | {rate:.2f} | {ratio} |{extra}{cpu_cells} {rss:.0f} | {rss / floor_rss:.2f} |")
    for name, runs in results.items():
        if runs and name.removeprefix(BASELINE).startswith("camx"):
            middle = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in middle["timings"].items())
            print(f"{name} time (median run): total {middle['seconds']:.2f}s; {parts}")


def _cpu_per_image(runs: list[dict]) -> float:
    found = [r["cpu"] / r["images"] for r in runs if "cpu" in r and r["images"]]
    return statistics.median(found) if found else float("nan")


def generate_square_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` JPEGs of ``size x size`` (the model's input size: maps compare without a resize)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"img{i:05d}.jpg", quality=90)


def compare_maps(mine: Path, theirs: Path, method: str) -> tuple[float, int]:
    """The largest |difference| between camx's ``KEY.METHOD.npy`` and a peer's ``KEY.npy``, and how many."""
    import numpy as np

    worst, count = 0.0, 0
    for peer in sorted(theirs.glob("*.npy")):
        ours = mine / f"{peer.stem}.{method}.npy"
        if ours.exists():
            worst = max(worst, float(np.abs(np.load(ours) - np.load(peer)).max()))
            count += 1
    return worst, count


def run_scale(args: argparse.Namespace) -> None:
    """Whole-process timings over two folder sizes; seconds per image from their difference."""
    from cam_cli.models import load_classifier
    from cam_cli.probe import default_target, run_probe

    small, large = sorted(args.scale)
    if small == large:
        raise SystemExit("--scale: give two different folder sizes")
    chosen = [n for n in (args.only or PERTURBATION) if available(n) or print(f"  {n}: not installed, skipped")]
    classifier = load_classifier(args.model, "NONE")
    args.layer = default_target(run_probe(classifier)).name  # the peers get camx's default layer
    size = classifier.input_size
    print(
        f"camx perturbation throughput: {args.model} (layer {args.layer}), whole processes over {small} and "
        f"{large} JPEGs of {size}x{size}, batch {args.batch_size}, device {args.device}, {args.precision}, "
        f"{os.cpu_count()} CPUs; overlays + .npy written",
        flush=True,
    )
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="camx-bench-") as tmp:
        folders = {large: Path(tmp) / f"images-{large}", small: Path(tmp) / f"images-{small}"}
        generate_square_images(folders[large], large, size)
        folders[small].mkdir()
        for path in sorted(folders[large].iterdir())[:small]:
            shutil.copy(path, folders[small] / path.name)
        for name in chosen:
            walls = {}
            for count in (small, large):
                out = Path(tmp) / f"out-{count}"
                started = time.perf_counter()
                r = run_child(name, args, folders[count], out)
                walls[count] = time.perf_counter() - started
                if r is None:
                    break
                print(f"  {name}: {count} images in {walls[count]:.1f} s (whole process)", flush=True)
            else:
                per_image = (walls[large] - walls[small]) / (large - small)
                rows[name] = {"walls": walls, "per_image": per_image, "start": walls[small] - small * per_image}
        print()
        print(f"| pipeline | {small} images (s) | {large} images (s) | s per image | images/s | start-up (s) | "
              "camx's speed-up |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name, row in rows.items():
            method = name.split("-", 1)[1]
            ours = rows.get(f"camx-{method}")
            speedup = ""
            if ours and name != f"camx-{method}":
                speedup = (
                    f"{row['per_image'] / ours['per_image']:.1f}x"
                    if ours["per_image"] > 0
                    else "camx's time per image is below what two sizes resolve"
                )
            rate = 1 / row["per_image"] if row["per_image"] > 0 else float("inf")
            print(f"| {name} | {row['walls'][small]:.1f} | {row['walls'][large]:.1f} | {row['per_image']:.3f} | "
                  f"{rate:.3f} | {row['start']:.1f} | {speedup} |")  # fmt: skip
        print()
        out = Path(tmp) / f"out-{large}"
        for name in rows:
            method = name.split("-", 1)[1]
            if name.startswith("camx-") or f"camx-{method}" not in rows:
                continue
            worst, count = compare_maps(out / method, out / name, method)
            print(f"maps: camx-{method} against {name}: max |difference| {worst:.2e} over {count} images")


if __name__ == "__main__":
    main()
