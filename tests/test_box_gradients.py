"""The R-CNN box branch differentiated row by row (``cam_cli.methods.box_gradients``) gives the
gradient at the target layer that autograd gives through the whole branch, per rank of detection
and image, on a real torchvision Faster R-CNN; the branch is restored afterwards."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from cam_cli.methods.base import TargetLayer
from cam_cli.methods.box_gradients import applies, sparse_box_gradients
from cam_cli.models.detection import default_layer, load_detector, lower_threshold
from cam_cli.probe.capture import ActivationCapture

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    module = load_detector(MODEL, "NONE", seed=0).module
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:  # random MobileNets shrink activations ~1e-8: give the BatchNorms real statistics
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        module([torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(0))])
    module.eval()
    lower_threshold(module, 0.0)
    return module


def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, 240, 320, generator=generator), torch.rand(3, 200, 300, generator=generator)]


def rank_gradients(module: nn.Module, sparse: bool, ranks: int = 3) -> tuple[list[torch.Tensor], list[dict]]:
    layer = default_layer(module)[0]
    context = sparse_box_gradients(module, layer) if sparse else contextlib.nullcontext()
    with torch.enable_grad(), context, ActivationCapture(module, TargetLayer(layer), True) as hooked:
        outputs = module(images())
        assert all(len(o["scores"]) >= ranks for o in outputs)
        found = []
        for r in range(ranks):
            score = sum(o["scores"][r] for o in outputs)
            (gradient,) = torch.autograd.grad(score, hooked.activation, retain_graph=True)
            found.append(gradient)
    return found, [{k: v.detach() for k, v in o.items()} for o in outputs]


def test_row_gradients_equal_autograd_through_the_whole_branch(detector: nn.Module) -> None:
    dense, dense_out = rank_gradients(detector, sparse=False)
    sparse, sparse_out = rank_gradients(detector, sparse=True)
    for a, b in zip(dense_out, sparse_out, strict=True):  # the same detections
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert a["labels"].tolist() == b["labels"].tolist()
    for r, (a, b) in enumerate(zip(dense, sparse, strict=True)):
        assert float(a.abs().max()) > 0, r
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=f"rank {r}")


def test_the_branch_is_restored_and_layers_inside_it_keep_autograd(detector: nn.Module) -> None:
    heads = detector.roi_heads
    before = (heads.box_roi_pool, heads.box_head, heads.box_predictor)
    with pytest.raises(RuntimeError), sparse_box_gradients(detector, "backbone.body.16"):
        assert heads.box_head is not before[1]
        raise RuntimeError("stop")
    assert (heads.box_roi_pool, heads.box_head, heads.box_predictor) == before
    assert applies(detector, "backbone.body.16")
    assert not applies(detector, "roi_heads.box_head.fc7")
    with sparse_box_gradients(detector, "roi_heads.box_head.fc7"):
        assert heads.box_head is before[1]
    ssd = load_detector("ssdlite320_mobilenet_v3_large", "NONE").module
    assert not applies(ssd, "backbone.features.0")
