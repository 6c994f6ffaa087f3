"""The report's MPRT section: per method, how similar its map stays to the trained model's
as more blocks are randomised (an inline SVG chart, no plotting library), with its verdict,
and one input's maps across randomisation depths as a strip of small images.

Reads ``OUT/metrics-summary.json`` (each method's ``mprt`` entry: mean curves, verdict)
and ``OUT/mprt/KEY.METHOD.npy`` (the strip's maps, written by ``camx evaluate``); writes the
strip's PNGs under ``DEST/mprt/``. Torch-free.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cam_cli import rundir
from cam_cli.rundir import write_atomic

WIDTH, HEIGHT, PAD = 260, 150, 28
#: the curves: rank correlation solid, SSIM dashed
CURVES = (("spearman_curve", "rank correlation", ""), ("ssim_curve", "SSIM", "4 3"))


def mprt_section(out_dir: Path, dest: Path) -> str:
    """The section's HTML (empty when the run has no MPRT summary); writes the strip PNGs."""
    try:
        summary = json.loads((out_dir / rundir.METRICS_SUMMARY).read_text("utf-8"))
    except (OSError, ValueError):
        return ""
    methods = summary.get("methods") if isinstance(summary, dict) else None
    if not isinstance(methods, dict):
        return ""
    order = [m for m in summary.get("ranking") or methods if isinstance(methods.get(m), dict)]
    verdicts = [(m, methods[m]["mprt"]) for m in order if isinstance(methods[m].get("mprt"), dict)]
    if not verdicts:
        return ""
    strips = _strips(out_dir, dest, [m for m, _ in verdicts])
    options = summary.get("options") or {}
    threshold = verdicts[0][1].get("threshold")
    note = (
        f"Adebayo et al. 2018: each method's map of the trained model against its map once the top blocks are "
        f"randomised ({html.escape(str(options.get('mprt_order', 'cascading')))}, seed "
        f"{html.escape(str(options.get('seed')))}); solid: rank correlation, dashed: SSIM, the grey line the "
        f"threshold {threshold}. A map that stays similar shows the image, not the model: lower is better, "
        f"and a method passes when the 95% interval after randomising everything lies below the threshold."
    )
    figures = "".join(_figure(m, v, strips.get(m)) for m, v in verdicts)
    return (
        '<section class="run mprt" id="mprt"><h2>Sanity check: model parameter randomisation</h2>'
        f'<p class="metrics-note">{note}</p><div class="mprt-charts">{figures}</div></section>'
    )


def _figure(method: str, verdict: dict[str, Any], strip: list[tuple[str, str]] | None) -> str:
    mean, low, high = (verdict.get(k) for k in ("mean", "low", "high"))
    numbers = f"{mean:.2f} [{low:.2f}, {high:.2f}]" if None not in (mean, low, high) else "–"
    state = str(verdict.get("verdict", ""))
    caption = (
        f'<figcaption><b>{html.escape(method)}</b> <span class="verdict {html.escape(state)}">'
        f"{html.escape(state)}</span> rank corr. {numbers}</figcaption>"
    )
    images = ""
    if strip:
        cells = "".join(
            f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(label, quote=True)}" '
            f'title="{html.escape(label, quote=True)}" width="32" height="32">'
            for src, label in strip
        )
        images = f'<div class="mprt-strip" aria-label="{html.escape(method)} maps by randomised blocks">{cells}</div>'
    return f'<figure class="mprt-chart">{chart(method, verdict)}{caption}{images}</figure>'


def chart(method: str, verdict: dict[str, Any]) -> str:
    """An SVG line chart: similarity (−1..1) against the number of randomised blocks (0 = trained, 1.0)."""
    depth = max((len(verdict.get(k) or []) for k, _, _ in CURVES), default=0)

    def x(i: int) -> float:
        return PAD + (WIDTH - PAD - 8) * i / max(depth, 1)

    def y(v: float) -> float:
        return 8 + (HEIGHT - PAD - 8) * (1 - v) / 2

    parts = [
        f'<line x1="{PAD}" y1="{y(v):.1f}" x2="{WIDTH - 8}" y2="{y(v):.1f}" stroke="#dde1e8"/>' for v in (-1, 0, 1)
    ]
    parts += [
        f'<text x="{PAD - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10" fill="#5b6475">{v:g}</text>'
        for v in (-1, 0, 1)
    ]
    threshold = verdict.get("threshold")
    if isinstance(threshold, (int, float)):
        parts.append(f'<line x1="{PAD}" y1="{y(threshold):.1f}" x2="{WIDTH - 8}" y2="{y(threshold):.1f}" '
                     'stroke="#9aa1ad" stroke-dasharray="2 2"/>')  # fmt: skip
    for key, _, dash in CURVES:
        values = [1.0, *(verdict.get(key) or [])]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if _finite(v))
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline points="{points}" fill="none" stroke="#2958c8" stroke-width="2"{dashes}/>')
    parts += [
        f'<text x="{x(i):.1f}" y="{y(-1) + 12:.1f}" text-anchor="middle" font-size="10" fill="#5b6475">{i}</text>'
        for i in sorted({0, depth // 2, depth})
    ]
    parts.append(
        f'<text x="{(WIDTH + PAD) / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle" font-size="10" fill="#5b6475">'
        f"blocks randomised (0–{depth}, from the top)</text>"
    )
    label = html.escape(f"{method}: similarity to the trained model's map against blocks randomised", quote=True)
    return (
        f'<svg class="mprt-svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}">'
        f"<title>{label}</title>{''.join(parts)}</svg>"
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _strips(out_dir: Path, dest: Path, methods: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Per method, the strip's images (relative source, label), written under ``DEST/mprt``."""
    folder = out_dir / rundir.MPRT_STRIPS
    files = sorted(folder.rglob("*.npy")) if folder.is_dir() else []
    strips: dict[str, list[tuple[str, str]]] = {}
    for index, method in enumerate(methods):
        found = [f for f in files if f.name.endswith(f".{method}.npy")]
        if not found:
            continue
        try:
            maps = np.load(found[0], allow_pickle=False).astype(np.float32)
        except (OSError, ValueError):
            continue
        key = found[0].relative_to(folder).as_posix()[: -len(f".{method}.npy")]
        strips[method] = []
        for depth, image in enumerate(maps):
            name = f"{rundir.MPRT_STRIPS}/{index}.d{depth:02d}.png"
            write_atomic(dest / name, _png(image))
            label = f"{key}: trained" if depth == 0 else f"{key}: {depth} block{'s' if depth > 1 else ''} randomised"
            strips[method].append((name, label))
    return strips


def _png(image: np.ndarray) -> bytes:
    """A map in [0, 1] coloured with the jet colormap, as PNG bytes."""
    v = np.clip(np.nan_to_num(image), 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
