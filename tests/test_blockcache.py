"""The block cache MPRT uses: with it attached, every method's maps of the model at every
randomisation depth are the maps of a full pass (a model with a skip connection and an
in-place addition on a block's output), and the trained bottom is really skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cam_cli
from cam_cli.metrics.blockcache import BlockCache
from cam_cli.metrics.randomisation import Randomiser

METHODS = "gradcam,gradcam++,hirescam,eigencam,cam,scorecam,fullgrad,guided-gradcam"


class Skippy(nn.Module):
    """stem -> body (conv, BN, ReLU, conv) added in place to the stem's output -> GAP -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.features = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        b = self.body(s)
        b += s[:, :, 1:-1, 1:-1]  # in place, on what a kept block gave back
        return self.fc(torch.flatten(self.pool(self.features(b)), 1))


def maps_by_depth(
    model: nn.Module, randomiser: Randomiser, x: torch.Tensor, methods: str
) -> list[dict[str, torch.Tensor]]:
    found = []
    for depth in range(len(randomiser.names) + 1):
        randomiser.set_depth(depth)
        found.append({m: r.maps for m, r in cam_cli.explain(model, x, methods, target=1).items()})
    randomiser.restore()
    return found


@pytest.mark.parametrize(
    ("order", "methods"),
    [("cascading", METHODS), ("independent", METHODS), ("cascading", "eigencam,scorecam")],  # the last without grad
)
def test_kept_blocks_give_the_maps_of_a_full_pass(order: str, methods: str) -> None:
    torch.manual_seed(0)
    model = Skippy().eval()
    with torch.no_grad():
        model.body[1].running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 18, 18)
    randomiser = Randomiser(model, seed=1, order=order)
    assert randomiser.names == ["fc", "features.0", "body.3", "body.1", "body.0", "stem"]
    plain = maps_by_depth(model, randomiser, x, methods)
    with BlockCache(model, randomiser) as cache:
        cache.expect(x)
        kept = maps_by_depth(model, randomiser, x, methods)
    assert cache.skipped > 0
    for depth, (ours, theirs) in enumerate(zip(kept, plain, strict=True)):
        for method in ours:
            torch.testing.assert_close(ours[method], theirs[method], atol=1e-6, rtol=0, msg=f"{method} at {depth}")
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left standing in
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
