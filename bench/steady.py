"""Steady-state throughput: whole processes over two folder sizes, so that start-up cancels.

``bench/throughput.py`` times a measured pass inside a process that has already done a
warm-up pass. This one times what a user runs: each pipeline (the floors, camx, camx from
a ``--baseline`` checkout) as one fresh process over A and then over B JPEGs (the first A
of the B, sizes between 320x240 and 640x480), and takes the seconds per image from the
difference, so that every pipeline's fixed cost (imports, model build, probe, worker
start-up, the first batch's kernel selection) cancels. CPU seconds per image come the same
way from the children's rusage. Each round runs every pipeline once over each size, one
after another; ratios are taken against the floor of the same round, and medians and
ranges over the rounds are reported. Not a test: nothing here asserts a timing.

    python bench/steady.py --model resnet50 --sizes 48 144 --batch-size 16 --precision bf16 \\
        --only floor floor-channels-last camx-gradcam --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (the pipelines and their child processes)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(name: str, args: argparse.Namespace, images: Path, out: Path) -> tuple[float, float] | None:
    """Wall and CPU seconds of one whole child process over ``images``."""
    cpu, started = children_cpu(), time.perf_counter()
    result = throughput.run_child(name, args, images, out)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return None if result is None else (wall, cpu)


def median_range(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = f" ({min(values):.2f}..{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--sizes", nargs=2, type=int, default=[48, 144], metavar=("A", "B"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=throughput.PIPELINES, default=["floor", "camx-gradcam"])
    parser.add_argument("--baseline", type=Path, help="a camx checkout: camx pipelines also run from it")
    args = parser.parse_args()
    args.whole_process, args.layer = True, None
    small, large = sorted(args.sizes)
    if small == large:
        raise SystemExit("--sizes: give two different folder sizes")
    chosen = list(args.only)
    if args.baseline:
        base = throughput.BASELINE
        chosen = [n for name in chosen for n in ([name, base + name] if name.startswith("camx") else [name])]
    rates: dict[str, list[float]] = {n: [] for n in chosen}
    ratios: dict[str, list[float]] = {n: [] for n in chosen}
    cpus: dict[str, list[float]] = {n: [] for n in chosen}
    with tempfile.TemporaryDirectory(prefix="camx-steady-") as tmp:
        folders = {large: Path(tmp) / f"images-{large}", small: Path(tmp) / f"images-{small}"}
        throughput.generate_images(folders[large], large)
        folders[small].mkdir()
        for path in sorted(folders[large].iterdir())[:small]:
            shutil.copy(path, folders[small] / path.name)
        print(
            f"camx steady state: {args.model}, whole processes over {small} and {large} JPEGs 320x240..640x480, "
            f"batch {args.batch_size}, {args.device}, {args.precision}, {args.rounds} round(s); "
            "overlays + .npy written",
            flush=True,
        )
        for round_ in range(1, args.rounds + 1):
            this: dict[str, float] = {}
            for name in chosen:
                runs = [timed(name, args, folders[n], Path(tmp) / "out") for n in (small, large)]
                if None in runs:
                    continue
                (wall_a, cpu_a), (wall_b, cpu_b) = runs  # type: ignore[misc]
                per_image = (wall_b - wall_a) / (large - small)
                this[name] = 1 / per_image if per_image > 0 else float("inf")
                rates[name].append(this[name])
                cpus[name].append((cpu_b - cpu_a) / (large - small))
                print(f"  round {round_} {name}: {wall_a:.1f} s / {wall_b:.1f} s -> {this[name]:.2f} img/s", flush=True)
            floor = this.get("floor")
            for name, rate in this.items():
                if floor:
                    ratios[name].append(rate / floor)
    print()
    print("| pipeline | img/s (median, range) | ratio to floor (median, range) | CPU s/image (median) |")
    print("|---|---|---|---|")
    for name in chosen:
        cpu = f"{statistics.median(cpus[name]):.3f}" if cpus[name] else "n/a"
        print(f"| {name} | {median_range(rates[name])} | {median_range(ratios[name])} | {cpu} |")


if __name__ == "__main__":
    main()
