"""What the CLIP and similarity tests share: real image files, the CLI run, reading its maps,
and pytorch-grad-cam's maps for the same scalar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from click.testing import CliRunner
from conftest import write_image
from PIL import Image
from test_method_parity import minmax, sign_corrected_projection
from torch import nn
from torchvision.transforms import InterpolationMode

from cam_cli.cli import main

#: methods checked against pytorch-grad-cam (its class, the camx name); CAM needs a linear head,
#: the guided ones ReLUs, FullGrad biases only; Score-CAM and kin are perturbation methods
GRADIENT = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam",
            "segeigencam", "finercam")  # fmt: skip
ACTIVATION = ("eigencam", "fem")
METHODS = (*GRADIENT, *ACTIVATION)


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` square images of the model's own size (camx then resizes nothing)."""
    return [write_image(folder / f"im{i}.png", size, size, seed=seed + i) for i in range(count)]


def run_camx(*args: object) -> object:
    result = CliRunner().invoke(main, ["explain", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return result


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def camx_maps(out: Path, method: str) -> dict[str, tuple[np.ndarray, int]]:
    """``{key: (map, class_index)}`` of one method's top-1 maps."""
    found = {}
    for record in read_manifest(out):
        if record["method"] == method:
            found[record["key"]] = (np.load(out / record["targets"][0]["map"]), record["targets"][0]["class_index"])
    return found


def tensor_of(paths: list[Path], size: int, mean: tuple, std: tuple, interpolation: str) -> torch.Tensor:
    """The images as the model sees them: resized whole to ``size`` and normalised."""
    mode = InterpolationMode(interpolation)
    images = []
    for path in paths:
        chw = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        resized = TF.resize(chw, [size, size], interpolation=mode, antialias=True).clamp(0, 255).float() / 255
        images.append((resized - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return torch.stack(images)


def pgc_maps(
    method: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list, reshape: Callable | None
) -> np.ndarray:
    """pytorch-grad-cam's maps ``(N, S, S)`` (Eigen-CAM and kin with the sign correction camx applies)."""
    import pytorch_grad_cam as pgc

    classes = {
        "gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "gradcam-elementwise": pgc.GradCAMElementWise,
        "eigengradcam": pgc.EigenGradCAM, "segeigencam": pgc.SegEigenCAM, "eigencam": pgc.EigenCAM, "fem": pgc.FEM,
    }  # fmt: skip
    model.requires_grad_(True)
    with sign_corrected_projection():
        if method == "finercam":
            with pgc.FinerCAM(model, [layer], reshape_transform=reshape) as cam:
                return cam(x, alpha=1.0, comparison_categories=[1])
        with classes[method](model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            return cam(input_tensor=x, targets=targets)


def assert_maps_equal(
    out: Path, method: str, keys: list[str], theirs: np.ndarray, classes: list[int], atol: float = 1e-4
) -> None:
    mine = camx_maps(out, method)
    for i, key in enumerate(keys):
        ours, index = mine[key]
        assert index == classes[i], f"{method} {key}: class {index}, the reference explains {classes[i]}"
        np.testing.assert_allclose(ours, minmax(theirs[i]), atol=atol, err_msg=f"{method} {key}")
