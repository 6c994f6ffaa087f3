"""The segmentation readout's shortcuts give what plain autograd and a whole softmax give: the
targets differentiated from the head's low-resolution logits (the final upsample's backward on
the explained class's mask only) equal autograd through the model's own upsample, and each
region's mean probability equals the mean of the full-resolution softmax over it."""

from __future__ import annotations

import pytest
import torch

from cam_cli.methods.base import TargetLayer
from cam_cli.models import load_classifier
from cam_cli.models.readout import Readout
from cam_cli.models.segmentation import RegionReadout
from cam_cli.probe.capture import ActivationCapture


def gradient(classifier, layer: str, x: torch.Tensor, plain: bool) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The targets of ``x`` and the gradient of each image's largest-region class at ``layer``."""
    readout = classifier.readout
    with torch.enable_grad(), ActivationCapture(classifier.module, TargetLayer(layer), True) as hooked:
        targets = Readout.read(readout, classifier.module, x) if plain else classifier.logits(x)
        chosen = readout.ranking(targets).argmax(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad(targets.gather(1, chosen).sum(), hooked.activation)
    return targets.detach(), grad


@pytest.mark.parametrize(("model", "layer"), [("lraspp_mobilenet_v3_large", "backbone.16"),
                                              ("fcn_resnet50", "backbone.layer4")])  # fmt: skip
def test_low_resolution_targets_give_autograds_gradient(model: str, layer: str) -> None:
    classifier = load_classifier(model, "NONE", input_size=72)
    with torch.no_grad():  # class scores that vary across the image, so that regions differ
        last = [m for m in classifier.module.classifier.modules() if isinstance(m, torch.nn.Conv2d)]
        last[-1].weight.mul_(30)
    x = torch.randn(3, 3, 72, 72, generator=torch.Generator().manual_seed(0))
    plain_targets, plain = gradient(classifier, layer, x, plain=True)
    targets, fast = gradient(classifier, layer, x, plain=False)
    torch.testing.assert_close(targets, plain_targets)
    assert float(plain.abs().max()) > 0
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    assert isinstance(classifier.readout, RegionReadout)


def test_region_probabilities_equal_the_softmax_mean() -> None:
    generator = torch.Generator().manual_seed(1)
    out = torch.randn(2, 21, 40, 56, generator=generator) * 4
    readout = RegionReadout()
    readout(out)
    assert readout.regions is not None
    labels = out.argmax(dim=1)
    softmax = out.softmax(dim=1)
    for n in range(2):
        for c in range(21):
            region = labels[n] == c
            expected = softmax[n, c][region].mean() if region.any() else torch.tensor(0.0)
            torch.testing.assert_close(readout.probabilities[n, c], expected, rtol=1e-5, atol=1e-7)
    with readout.pinned():  # a pinned pass reads the original masks, whatever the new argmax
        readout(out.flip(-1))
    flipped = out.flip(-1).softmax(dim=1)
    c = int(labels[0].flatten().bincount(minlength=21)[1:].argmax()) + 1
    torch.testing.assert_close(readout.probabilities[0, c], flipped[0, c][labels[0] == c].mean(), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
