"""Colour map, blending and the written overlay's channel order."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cam_cli.device import use_ieee_fp32
from cam_cli.jobs.explain.writer import encode as _encode
from cam_cli.render import blend, colorize, jet_lut, render_on_device, render_with_opencv


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def render(path: str, maps: torch.Tensor, image: torch.Tensor, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    if path == "opencv":
        return render_with_opencv(maps.numpy(), image.numpy(), alpha)
    return render_on_device(maps, image, alpha)


@pytest.mark.parametrize("path", ["opencv", "device"])
def test_hot_is_red_and_cold_is_blue_in_the_written_png(path):
    low = torch.zeros(1, 5, 5)
    low[0, 0, 0] = 1.0  # hot top-left corner at low resolution
    grey = torch.full((20, 30, 3), 128, dtype=torch.uint8)
    _, overlay = render(path, low, grey, alpha=1.0)
    written = decode(_encode(overlay[0], "png"))
    r, g, b = (int(v) for v in written[1, 1])
    assert r >= 120 and g == 0 and b == 0, f"hot corner should be red, got {(r, g, b)}"
    r, g, b = (int(v) for v in written[15, 25])
    assert b >= 120 and r == 0 and g == 0, f"cold area should be blue, got {(r, g, b)}"


@pytest.mark.parametrize("path", ["opencv", "device"])
def test_jpeg_overlay_keeps_the_colours_too(path):
    low = torch.zeros(1, 8, 8)
    low[0, 0, 0] = 1.0
    _, overlay = render(path, low, torch.zeros(64, 64, 3, dtype=torch.uint8), alpha=1.0)
    written = decode(_encode(overlay[0], "jpg")).astype(int)
    assert written[1, 1, 0] > 100 and written[1, 1, 2] < 40
    assert written[40, 40, 2] > 100 and written[40, 40, 0] < 40


def test_lut_is_opencv_jet_in_rgb_order():
    lut = jet_lut(torch.device("cpu"))
    assert lut.shape == (256, 3) and lut.dtype == torch.uint8
    assert lut[0].tolist() == [0, 0, 128]  # dark blue
    assert lut[255].tolist() == [128, 0, 0]  # dark red
    assert int(lut[128, 1]) == 255  # green in the middle


def test_blend_is_alpha_heat_plus_one_minus_alpha_image():
    image = torch.tensor([[[200, 100, 0]]], dtype=torch.uint8)
    heat = torch.tensor([[[[0, 0, 255]]]], dtype=torch.uint8)
    out = blend(image, heat, alpha=0.4)
    assert out[0, 0, 0].tolist() == [round(0.6 * 200), round(0.6 * 100), round(0.4 * 255)]


def test_colour_index_truncates_like_uint8_of_255_times_map():
    m = torch.tensor([[[0.0, 0.5, 0.999, 1.0]]])
    lut = jet_lut(torch.device("cpu"))
    heat = colorize(m)[0, 0]
    for j, value in enumerate([0.0, 0.5, 0.999, 1.0]):
        assert heat[j].tolist() == lut[int(255 * value)].tolist()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("height", "width"), [(37, 53), (224, 224), (5, 3), (1, 1), (480, 641)])
def test_opencv_and_device_paths_agree(height, width, device):
    generator = torch.Generator().manual_seed(height * width)
    maps = torch.randn(2, 7, 7, generator=generator)
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    norm_cv, over_cv = render_with_opencv(maps.numpy(), image.numpy(), 0.4)
    norm_t, over_t = render_on_device(maps.to(device), image, 0.4)
    assert norm_cv.shape == norm_t.shape == (2, height, width) and norm_cv.dtype == np.float32
    assert over_cv.shape == over_t.shape == (2, height, width, 3) and over_cv.dtype == np.uint8
    np.testing.assert_allclose(norm_cv, norm_t, atol=1e-6)
    # the colour index may differ by one where 255 * map sits on an integer boundary
    assert np.abs(over_cv.astype(int) - over_t.astype(int)).max() <= 3
    assert (over_cv != over_t).any(axis=-1).mean() < 0.01


@pytest.mark.parametrize("path", ["opencv", "device"])
@pytest.mark.parametrize("raw", [[[[0.37]]], [[[2.5, 2.5], [2.5, 2.5]]], [[[0.0, 0.0], [0.0, 0.0]]]])
def test_a_flat_raw_map_gives_zeros_not_stretched_rounding(path, raw):
    """A 1x1 layer or a constant map carries no spatial information: no fake peak."""
    maps = torch.tensor(raw, dtype=torch.float32)
    norm, overlay = render(path, maps, torch.zeros(50, 80, 3, dtype=torch.uint8), 0.4)
    assert norm.shape == (1, 50, 80) and float(np.abs(norm).max()) == 0.0
    assert (overlay == overlay[0, 0, 0]).all()


def test_fp32_on_cuda_means_ieee_fp32_not_tf32():
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    before = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    try:
        use_ieee_fp32()
        if new_api:
            assert conv.fp32_precision == "ieee"
        else:
            assert torch.backends.cudnn.allow_tf32 is False
    finally:
        if new_api:
            conv.fp32_precision = before
        else:
            torch.backends.cudnn.allow_tf32 = before
