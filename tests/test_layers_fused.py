"""Several target layers at once (``--layer a,b``): every layer hooked in the same pass, the
gradients of all from one backward pass, the maps fused as pytorch-grad-cam fuses its
``target_layers`` (each min-maxed, resized to the input, averaged, min-maxed)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_method_parity import MODELS, SIZE, batch, frozen, minmax, reshape_for, sign_corrected_projection, target_of
from torch.nn.attention import SDPBackend, sdpa_kernel

import cam_cli
from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.errors import ModelError

LAYERS = {
    "tiny": ["features.1", "features.3"],
    "bnnet": ["features.2", "features.5"],
    "vit": ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1.ln_1"],
}
FUSED = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "segeigencam", "scorecam"]


def reference(name: str, model_key: str, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = MODELS[model_key]().requires_grad_(True)
    layers = [model.get_submodule(n) for n in LAYERS[model_key]]
    reshape = reshape_for(model_key, target_of(frozen(MODELS[model_key]())))  # tokens -> (N, K, h, w)
    cls = {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
        "hirescam": pgc.HiResCAM,
        "eigencam": pgc.EigenCAM,
        "segeigencam": pgc.SegEigenCAM,
        "scorecam": pgc.ScoreCAM,
    }[name]
    kernels = sdpa_kernel([SDPBackend.MATH])
    with kernels, sign_corrected_projection(), exact_min_max(), cls(model, layers, reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


@contextlib.contextmanager
def exact_min_max() -> Iterator[None]:
    """pytorch-grad-cam's per-layer scaling with camx's exact min-max: its ``1e-7`` in the
    denominator weighs each layer by ``max / (max + 1e-7)``, which moves fused maps of small
    range (an untrained model's) by up to ~1e-3 (docs/methods.md)."""
    import cv2
    import pytorch_grad_cam.base_cam as base

    def scale(cam: np.ndarray, target_size: tuple[int, int] | None = None) -> np.ndarray:
        result = []
        for img in cam:
            img = img - np.min(img)
            img = img / np.max(img) if np.max(img) > 0 else img
            result.append(cv2.resize(np.float32(img), target_size) if target_size is not None else img)
        return np.float32(result)

    saved = base.scale_cam_image
    base.scale_cam_image = scale
    try:
        yield
    finally:
        base.scale_cam_image = saved


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", list(LAYERS))
@pytest.mark.parametrize("name", FUSED)
def test_fused_layers_equal_pytorch_grad_cams_target_layers(name: str, model_key: str, n: int) -> None:
    x = batch(n, seed=n + 10)
    result = cam_cli.explain(frozen(MODELS[model_key]()), x, methods=name, layer=LAYERS[model_key])[name]
    assert result.maps.shape == (n, SIZE, SIZE)
    theirs = reference(name, model_key, x, result.classes)
    for i in range(n):
        np.testing.assert_allclose(result.maps[i].numpy(), minmax(theirs[i]), atol=1e-4, err_msg=f"{name} {i}")


def test_fusing_differs_from_either_layer_alone_and_takes_one_pass() -> None:
    model = frozen(MODELS["bnnet"]())
    x = batch(2, seed=3)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))

    def forwards(layer: str) -> tuple[torch.Tensor, int]:
        calls.clear()
        maps = cam_cli.explain(model, x, methods="gradcam,layercam", layer=layer)["gradcam"].maps
        return maps, len(calls)

    try:
        fused, fused_calls = forwards("features.2,features.5")
        alone = [forwards(name) for name in LAYERS["bnnet"]]
    finally:
        handle.remove()
    assert fused_calls == alone[0][1] == alone[1][1]  # the probe and one pass, whatever the layers
    assert all(not torch.allclose(fused, maps, atol=1e-3) for maps, _ in alone)


def test_cam_and_ablationcam_take_one_layer() -> None:
    for name in ("cam", "ablationcam"):
        with pytest.raises(ModelError, match=f"{name} .*one --layer"):
            cam_cli.explain(frozen(MODELS["tiny"]()), batch(1), methods=name, layer="features.1,features.3")


def test_several_layers_through_the_cli(image_dir, tiny_factory, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(main, [*args, "-q", "--json", "--method", "gradcam,eigencam", "--layer",
                                       "features.1", "--layer", "features.3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["done"] == 6
    records = rundir.load_manifest(out / "manifest.jsonl")
    assert {r["layer"] for r in records.values()} == {"features.1,features.3"}
    assert np.load(out / "a.jpg.gradcam.npy").shape == (45, 67) and np.load(out / "a.jpg.gradcam.npy").max() == 1
    twice = CliRunner().invoke(main, [*args, "--method", "gradcam", "--layer", "features.1,features.1"])
    assert twice.exit_code == 1 and "names a layer twice" in twice.stderr
