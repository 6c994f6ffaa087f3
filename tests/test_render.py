"""Colour map, blending and the written overlay's channel order."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from cam_cli.pipeline import _encode
from cam_cli.render import blend, colorize, jet_lut


def corner_map(height: int = 20, width: int = 30) -> torch.Tensor:
    m = torch.zeros(1, height, width)
    m[0, :4, :4] = 1.0
    return m


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_hot_is_red_and_cold_is_blue_in_the_written_png():
    heat = colorize(corner_map())
    grey = torch.full((20, 30, 3), 128, dtype=torch.uint8)
    overlay = blend(grey, heat, alpha=1.0)[0].numpy()
    written = decode(_encode(overlay, "png"))
    r, g, b = (int(v) for v in written[1, 1])
    assert r >= 120 and g == 0 and b == 0, f"hot corner should be red, got {(r, g, b)}"
    r, g, b = (int(v) for v in written[15, 25])
    assert b >= 120 and r == 0 and g == 0, f"cold area should be blue, got {(r, g, b)}"


def test_jpeg_overlay_keeps_the_colours_too():
    heat = colorize(corner_map(64, 64))
    overlay = blend(torch.zeros(64, 64, 3, dtype=torch.uint8), heat, alpha=1.0)[0].numpy()
    written = decode(_encode(overlay, "jpg")).astype(int)
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
