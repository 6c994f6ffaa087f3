"""The maths of CAM and Grad-CAM against hand computation, identities and the reference libraries."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import make_tiny
from helpers import CAMRunner as CAM
from helpers import GradCAMRunner as GradCAM

from cam_cli.methods import TargetLayer
from cam_cli.models import Classifier
from cam_cli.probe import cam_head, default_target, run_probe
from cam_cli.render import upsample_normalise

SIZE = 32


def classifier_of(model: torch.nn.Module) -> Classifier:
    return Classifier(module=model, name="tiny", weights="seeded", input_size=SIZE)


def batch(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def top1(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1, keepdim=True)


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min() + 1e-7)


def test_default_target_is_the_tensor_entering_the_pooling(tiny_model):
    target = default_target(run_probe(classifier_of(tiny_model)))
    assert target == TargetLayer("features", "output", "nchw")


def test_cam_equals_the_hand_computed_fc_weighted_sum(tiny_model):
    x = batch()
    target = TargetLayer("features")
    head = cam_head(run_probe(classifier_of(tiny_model)), target)
    result = CAM(tiny_model, tiny_model, target, head.weight).explain(x, top1)

    features = tiny_model.features(x)  # (N, K, h, w)
    weight = tiny_model.fc.weight  # (C, K)
    classes = tiny_model(x).argmax(1)
    for i in range(x.shape[0]):
        expected = sum(weight[classes[i], k] * features[i, k] for k in range(features.shape[1]))
        torch.testing.assert_close(result.maps[i, 0], expected, rtol=1e-5, atol=1e-6)
    assert result.maps.shape == (3, 1, SIZE // 2, SIZE // 2)
    assert result.maps.dtype == torch.float32
    assert (result.maps < 0).any(), "CAM has no ReLU: negative evidence must survive"


def test_cam_for_a_fixed_class_index(tiny_model):
    x = batch()
    target = TargetLayer("features")
    head = cam_head(run_probe(classifier_of(tiny_model)), target)
    chooser = lambda logits: torch.full((logits.shape[0], 1), 3)  # noqa: E731
    result = CAM(tiny_model, tiny_model, target, head.weight).explain(x, chooser)
    expected = torch.einsum("k,nkhw->nhw", tiny_model.fc.weight[3], tiny_model.features(x))
    torch.testing.assert_close(result.maps[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert result.classes.flatten().tolist() == [3, 3, 3]


def test_gradcam_equals_relu_of_cam_after_normalisation(tiny_model):
    """For GAP + linear, alpha_k = W[c, k] / (h w), so Grad-CAM is ReLU(CAM) up to scale."""
    x = batch(4)
    target = TargetLayer("features")
    head = cam_head(run_probe(classifier_of(tiny_model)), target)
    cam = CAM(tiny_model, tiny_model, target, head.weight).explain(x, top1)
    grad = GradCAM(tiny_model, tiny_model, target).explain(x, top1)
    assert torch.equal(cam.classes, grad.classes)
    h, w = cam.maps.shape[-2:]
    torch.testing.assert_close(grad.maps * (h * w), torch.relu(cam.maps), rtol=1e-5, atol=1e-6)
    for i in range(4):
        a = upsample_normalise(torch.relu(cam.maps[i]), 37, 29)
        b = upsample_normalise(grad.maps[i] * (h * w), 37, 29)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (grad.maps >= 0).all() and (grad.maps > 0).any()


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_batch_size_does_not_change_the_maps(tiny_model, method):
    x = batch(5)
    target = TargetLayer("features")
    if method == "cam":
        explainer = CAM(tiny_model, tiny_model, target, cam_head(run_probe(classifier_of(tiny_model)), target).weight)
    else:
        explainer = GradCAM(tiny_model, tiny_model, target)
    together = explainer.explain(x, top1).maps
    alone = torch.cat([explainer.explain(x[i : i + 1], top1).maps for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_gradcam_topk_gives_one_map_per_rank(tiny_model):
    x = batch(2)
    result = GradCAM(tiny_model, tiny_model, TargetLayer("features")).explain(
        x, lambda logits: logits.topk(3, dim=1).indices
    )
    assert result.maps.shape == (2, 3, SIZE // 2, SIZE // 2)
    single = GradCAM(tiny_model, tiny_model, TargetLayer("features")).explain(
        x, lambda logits: logits.topk(3, dim=1).indices[:, 2:3]
    )
    torch.testing.assert_close(result.maps[:, 2], single.maps[:, 0])


def test_gradcam_matches_pytorch_grad_cam(tiny_model):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = batch(3)
    ours = GradCAM(tiny_model, tiny_model, TargetLayer("features")).explain(x, top1)
    model = make_tiny().requires_grad_(True)  # the reference needs a graph; same seed, same weights
    with ReferenceGradCAM(model=model, target_layers=[model.features]) as reference:
        targets = [ClassifierOutputTarget(int(c)) for c in ours.classes[:, 0]]
        theirs = reference(input_tensor=x, targets=targets)  # normalised, resized to SIZE
    for i in range(3):
        mine = upsample_normalise(ours.maps[i], SIZE, SIZE)[0].numpy()
        np.testing.assert_allclose(mine, minmax(theirs[i]), atol=1e-4)


def test_cam_matches_torchcam(tiny_model):
    from torchcam.methods import CAM as ReferenceCAM

    x = batch(2)
    target = TargetLayer("features")
    head = cam_head(run_probe(classifier_of(tiny_model)), target)
    ours = CAM(tiny_model, tiny_model, target, head.weight).explain(x, top1)
    model = make_tiny()
    with ReferenceCAM(model, target_layer="features", fc_layer="fc", input_shape=(3, SIZE, SIZE)) as reference:
        scores = model(x)
        (theirs,) = reference(class_idx=ours.classes[:, 0].tolist(), scores=scores)
    for i in range(2):
        mine = ours.maps[i, 0].numpy()
        np.testing.assert_allclose(minmax(mine), theirs[i].numpy(), atol=1e-4)


def test_upsampling_is_bilinear_to_odd_sizes_then_normalised():
    raw = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 9.0]]])
    out = upsample_normalise(raw, 7, 11)
    assert out.shape == (1, 7, 11) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and abs(float(out.max()) - 1.0) < 1e-6
    reference = cv2.resize(raw[0].numpy(), (11, 7), interpolation=cv2.INTER_LINEAR)  # half-pixel centres
    np.testing.assert_allclose(out[0].numpy(), minmax(reference), atol=1e-6)


def test_a_flat_map_normalises_to_zero_not_nan():
    out = upsample_normalise(torch.full((1, 3, 3), 5.0), 4, 4)
    assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0


def test_cam_is_refused_on_a_head_that_is_not_gap_plus_linear():
    from cam_cli.errors import ModelError

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).eval()
    probe = run_probe(classifier_of(model))
    target = default_target(probe)
    with pytest.raises(ModelError, match=r"Linear -> Tanh -> Linear.*gradcam"):
        cam_head(probe, target)
