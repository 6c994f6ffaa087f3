"""ARCC against pytorch-grad-cam 1.5's ``ARCC`` itself: the same camx Grad-CAM maps of a
seeded tiny model, camx's Grad-CAM as its base method (which explains the masked images
again), a softmax target and its ROAD imputer's noise set to 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from helpers import GradCAMRunner
from pytorch_grad_cam.metrics.arcc import ARCC
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from cam_cli.methods import TargetLayer
from cam_cli.metrics.arcc import arcc, coherency, combine, complexity
from cam_cli.render import upsample_normalise

SIZE = 32


def camx_gradcam(model: torch.nn.Module):  # noqa: ANN201
    """camx's Grad-CAM of the given classes as ``(N, S, S)`` maps in [0, 1]."""
    runner = GradCAMRunner(model, model, TargetLayer("features"))

    def explain(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        result = runner.explain(x, lambda logits: classes.view(-1, 1).to(logits.device))
        return torch.stack([upsample_normalise(result.maps[i], SIZE, SIZE)[0] for i in range(x.shape[0])])

    return explain


@pytest.mark.slow
def test_arcc_equals_pytorch_grad_cam(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny(seed=1)
    # smooth images, so that the Grad-CAM maps are not mostly zeros (ROAD's imputer needs kept pixels)
    small = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    images = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    classes = model(images).argmax(1)
    explain = camx_gradcam(model)
    maps = explain(images, classes)
    ours = arcc(images, maps, classes, model, explain, noise=0.0, batch_size=5)

    monkeypatch.setattr(
        NoisyLinearImputer.__init__, "__defaults__", (0.0,) + NoisyLinearImputer.__init__.__defaults__[1:]
    )

    def base_method(input_tensor: torch.Tensor, targets: object) -> np.ndarray:
        return explain(input_tensor, classes).numpy()

    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    theirs = ARCC(base_method)(images, maps.numpy(), targets, model)
    assert np.isfinite(theirs).all()
    np.testing.assert_allclose(ours["arcc"].numpy(), theirs, atol=1e-4)
    assert (ours["arcc"] > 0).all() and (ours["arcc"] <= 1).all()


def test_the_parts_by_hand() -> None:
    maps = np.array([[[0.0, 1.0], [0.5, 0.5]]])
    assert complexity(maps)[0] == pytest.approx(0.5)
    assert coherency(maps, maps)[0] == pytest.approx(1.0, abs=1e-7)
    assert coherency(maps, 1 - maps)[0] == pytest.approx(0.0, abs=1e-7)
    # a harmonic mean: three equal scores give that score; one of zero gives (about) zero
    assert combine(np.array([0.6]), np.array([0.4]), np.array([0.3]))[0] == pytest.approx(0.6, abs=1e-6)
    assert combine(np.array([0.9]), np.array([0.1]), np.array([-0.2]))[0] == pytest.approx(0.0, abs=1e-6)
