"""Large images in strips: the same bytes as the whole image at once, with less memory."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image
from PIL import Image

from cam_cli import images, render
from cam_cli.cli import main


def whole_image_render(raw: np.ndarray, image: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The CPU render as it was before strips: every step on full-size arrays."""
    height, width = image.shape[:2]
    up = cv2.resize(raw.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low = float(up.min())
    norm = ((up - low) / np.float32(float(up.max()) - low)).astype(np.float32)
    index = np.multiply(norm, 255.0, dtype=np.float32).astype(np.uint8)
    heat = cv2.applyColorMap(index, cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(heat, alpha, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 1.0 - alpha, 0.0)
    return norm, overlay


@pytest.mark.parametrize("strip", [1, 7 * 301, 1 << 30])
@pytest.mark.parametrize(("height", "width"), [(301, 457), (1, 5), (64, 1)])
def test_overlay_in_strips_is_the_whole_image_render(monkeypatch, strip, height, width):
    rng = np.random.default_rng(height + width)
    raw = rng.standard_normal((7, 7)).astype(np.float32)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    monkeypatch.setattr(render, "STRIP_PIXELS", strip)
    norm = render.upsample_normalise_opencv(raw, height, width)
    overlay = render.overlay_opencv(norm, image, 0.4)
    want_norm, want_overlay = whole_image_render(raw, image, 0.4)
    assert norm.dtype == np.float32 and np.array_equal(norm.view(np.int32), want_norm.view(np.int32))
    assert overlay.shape == (height, width, 3) and np.array_equal(overlay, want_overlay)


def test_pixels_in_strips_are_pillows_pixels(tmp_path, monkeypatch):
    path = write_image(tmp_path / "wide.jpg", 301, 97, seed=3)
    with Image.open(path) as opened:
        want = np.array(opened.convert("RGB"))
    monkeypatch.setattr(images, "STRIP_PIXELS", 301 * 10)
    monkeypatch.setattr(images, "TRIM_PIXELS", 1)  # also give the decode's memory back
    assert np.array_equal(images.decode_image(path), want)


def test_exif_rotation_in_place_still_rotates(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(path, exif=exif)
    assert images.decode_image(path).shape == (40, 20, 3)


def explain(inputs: Path, out: Path, model: str, *extra: str) -> None:
    args = ["explain", str(inputs), "-o", str(out), "--model", model, "-q", "--workers", "0"]
    result = CliRunner().invoke(main, [*args, "--method", "gradcam,layercam", *extra])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_a_large_image_in_strips_writes_the_same_bytes(tmp_path, tiny_factory, monkeypatch, fmt):
    """A 3000x2000 JPEG through the CLI, in strips of a few rows against one strip."""
    folder = tmp_path / "in"
    write_image(folder / "large.jpg", 3000, 2000, seed=7)
    write_image(folder / "small.jpg", 67, 45, seed=8)
    extra = ("--target", "top2", "--format", fmt)
    monkeypatch.setattr(render, "STRIP_PIXELS", 1 << 40)
    monkeypatch.setattr(images, "STRIP_PIXELS", 1 << 40)
    explain(folder, tmp_path / "whole", tiny_factory, *extra)
    monkeypatch.setattr(render, "STRIP_PIXELS", 3000 * 3 + 17)
    monkeypatch.setattr(images, "STRIP_PIXELS", 3000 * 5)
    monkeypatch.setattr(images, "TRIM_PIXELS", 1)
    explain(folder, tmp_path / "strips", tiny_factory, *extra)
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "strips").iterdir()) == whole
    maps = [n for n in whole if n.endswith(".npy")]
    assert len(maps) == 8 and not [n for n in whole if "camx-tmp" in n]  # 2 images x 2 methods x top2
    for name in maps:
        a, b = np.load(tmp_path / "whole" / name), np.load(tmp_path / "strips" / name)
        assert a.dtype == np.float32 and np.array_equal(a, b)
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "strips" / name).read_bytes()
    for name in (n for n in whole if n.endswith(f".{fmt}")):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "strips" / name).read_bytes(), name
    assert np.load(tmp_path / "whole" / "large.jpg.gradcam.top1.npy").shape == (2000, 3000)
