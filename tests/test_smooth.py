"""Smooth Grad-CAM++ (cam_cli/methods/smooth.py): its maps are the paper's formula on camx's
documented noise draws, whatever way the passes are batched, and in the deterministic limit
(no noise) they are torchcam's SmoothGradCAMpp (corrected as docs/methods.md says) and
camx's Grad-CAM++."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import make_tiny
from test_method_parity import (
    SIZE,
    batch,
    corrected_smoothgradcampp,
    frozen,
    make_bnnet,
    make_vit,
    ours,
    target_of,
    torchcam_maps,
)
from torch import nn

from cam_cli.methods import BatchExplainer, MethodOptions, Setup, create
from cam_cli.methods.base import TargetLayer
from cam_cli.methods.explain import fuse_layers
from cam_cli.methods.smooth import draw_seed
from cam_cli.models import Classifier
from cam_cli.probe import default_target, run_probe
from cam_cli.probe.capture import resolve_module

#: two layers of the small BN network (several --layer)
LAYERS = ["features.2", "features.5"]


def camx_raw(model: nn.Module, x: torch.Tensor, batch_size: int, layers: list[str] | None = None,
             sizes: list[int] | None = None, **options: object) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """camx's raw maps ``(N, h, w)`` (several ``layers``: fused, ``(N, S, S)``) and classes
    ``(N,)``, its noisy passes ``batch_size`` at a time; ``sizes`` collects every pass's batch size."""
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    targets = [TargetLayer(name) for name in layers] if layers else [default_target(probe)]
    method = create("smoothgradcam++", MethodOptions(**options))  # type: ignore[arg-type]
    method.prepare(Setup(probe, targets[0], model, model, torch.device("cpu"), tuple(targets)))

    def forward(t: torch.Tensor) -> torch.Tensor:
        if sizes is not None:
            sizes.append(len(t))
        return model(t)

    explainer = BatchExplainer(forward, model, targets, [method])
    explainer.batch_size = batch_size
    result = explainer.explain(x, lambda logits: logits.argmax(1, keepdim=True))
    return result.maps["smoothgradcam++"][:, 0], result.classes[:, 0]


def formula(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, samples: int, std: float, seed: int,
            layer_name: str | None = None) -> torch.Tensor:  # fmt: skip
    """The paper's Smooth Grad-CAM++ written out plainly, one image and one noisy copy at a
    time through the whole model: sample ``s``'s noise ``(3, S, S)`` drawn from
    ``draw_seed(seed, s)`` (as docs/methods.md says), ``g`` at the layer by autograd, the means
    of ``g``, ``g^2``, ``g^3``, Grad-CAM++'s weights on the plain input's ``A``; ``(N, h, w)``."""
    layer = resolve_module(model, layer_name or target_of(model).name)
    seen: list[torch.Tensor] = []

    def keep(_: nn.Module, __: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        seen.append(leaf)
        return leaf * 1.0

    maps = []
    handle = layer.register_forward_hook(keep)
    try:
        for i in range(len(x)):
            sums = [torch.zeros((), dtype=torch.float64) for _ in range(3)]
            for s in range(samples):
                generator = torch.Generator().manual_seed(draw_seed(seed, s))
                noise = torch.empty(x.shape[1:]).normal_(0.0, std, generator=generator)
                with torch.enable_grad():
                    out = model((x[i] + noise)[None])
                    (g,) = torch.autograd.grad(out[0, int(classes[i])], seen[-1])
                sums = [total + g[0].double() ** (p + 1) for p, total in enumerate(sums)]
            with torch.no_grad():
                model(x[i : i + 1])
            a = seen[-1][0].detach().double()
            m1, m2, m3 = (total / samples for total in sums)
            alpha = m2 / (2 * m2 + a.sum(dim=(1, 2), keepdim=True) * m3 + 1e-6)
            alpha = torch.where(m2 != 0, alpha, torch.zeros_like(alpha))
            weights = (torch.relu(m1) * alpha).sum(dim=(1, 2))
            maps.append(torch.relu((weights[:, None, None] * a).sum(dim=0)))
    finally:
        handle.remove()
    return torch.stack(maps).float()


@pytest.mark.parametrize(("n", "batch_size"), [(1, 1), (4, 3), (4, 16)])
def test_smoothgradcam_is_the_formula_on_the_documented_noise(n: int, batch_size: int) -> None:
    """Pins both the draws (``--seed``, sample index) and the arithmetic: batching the noisy
    copies of several images together changes neither (float64 reference, 1e-5 of the map)."""
    model = frozen(make_bnnet())
    x = batch(n, seed=11)
    mine, classes = camx_raw(model, x, batch_size, noise_samples=3, noise_std=0.8, seed=4)
    theirs = formula(model, x, classes, samples=3, std=0.8, seed=4)
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5 * scale)
    plain, _ = camx_raw(model, x, batch_size, noise_samples=3, noise_std=0.0, seed=4)
    assert float((plain - mine).abs().max()) > 1e-2 * scale, "the noise made no difference"


@pytest.mark.parametrize("n", [1, 4])
def test_smoothgradcam_without_noise_is_torchcams_corrected_smoothgradcampp(n: int) -> None:
    """The deterministic limit: torchcam's own noisy passes, hooks and averaging with the
    noise switched off (its sampler replaced by zeros), its three departures from Grad-CAM++
    put right (docs/methods.md), equal camx's map after camx's finish."""
    x = batch(n, seed=n + 40)
    mine, classes = ours("smoothgradcam++", frozen(make_bnnet()), x, noise_std=0.0, noise_samples=3)
    cls = corrected_smoothgradcampp()

    class Noiseless(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._distrib = types.SimpleNamespace(sample=torch.zeros)

    theirs = torchcam_maps(Noiseless, "bnnet", x, classes, num_samples=3)
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_smoothgradcam_of_several_layers_takes_one_set_of_noisy_passes() -> None:
    """``--layer a,b``: both layers' derivatives from the same noisy passes (``N`` an image, not
    ``N`` per layer), each layer's map the formula's, fused as every method's are."""
    model = frozen(make_bnnet())
    x = batch(2, seed=12)
    sizes: list[int] = []
    fused, classes = camx_raw(model, x, 4, LAYERS, sizes, noise_samples=3, noise_std=0.8, seed=4)
    assert sizes == [2, 4, 2], "one plain pass, then the 2 x 3 noisy copies in passes of 4"
    per_layer = [formula(model, x, classes, 3, 0.8, 4, name)[:, None] for name in LAYERS]
    expected = fuse_layers(per_layer, (SIZE, SIZE))[:, 0]
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "per_image"), [("smoothgradcam++", 3), ("sscam", 3 * 12), ("iscam", 3 * 12)])
def test_smoothgradcam_sscam_and_iscam_count_the_passes_they_take(name: str, per_image: int) -> None:
    """``passes_per_image`` (the progress bar's total) is what the passes' counter will reach."""
    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    method = create(name, MethodOptions(noise_samples=3))
    method.prepare(Setup(probe, default_target(probe), model, model, torch.device("cpu")))
    assert method.passes_per_image == per_image
    explainer = BatchExplainer(model, model, default_target(probe), [method])
    passes: list[int] = []
    explainer.batch_size, explainer.on_passes = 5, passes.append
    explainer.explain(batch(2), lambda logits: logits.argmax(1, keepdim=True))
    assert sum(passes) == 2 * method.passes_per_image


def prepared(model: nn.Module, **options: object):  # noqa: ANN201
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    method = create("smoothgradcam++", MethodOptions(**options))  # type: ignore[arg-type]
    method.prepare(Setup(probe, default_target(probe), model, model, torch.device("cpu")))
    return method


def test_after_a_gap_and_linear_head_the_noisy_copies_are_skipped_and_the_maps_unchanged() -> None:
    """At the input of a GAP + linear head (the tiny model's ``features``, ResNet's ``layer4``)
    the gradient is the head's weight over h*w for every input: the noise cannot change it,
    so camx runs the plain images once instead of N noisy copies; the maps are still the
    formula's with the noise (its float64 sums: to 1e-6 of the map)."""
    model = make_tiny()
    method = prepared(model, noise_samples=4, noise_std=0.8)
    assert (method.copies, method.passes_per_image) == (1, 1)
    x = batch(3, seed=13)
    sizes: list[int] = []
    mine, classes = camx_raw(model, x, 16, None, sizes, noise_samples=4, noise_std=0.8, seed=4)
    assert sizes == [3, 3], "the plain pass, then one pass of the plain images for the gradient"
    theirs = formula(model, x, classes, samples=4, std=0.8, seed=4)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6 * float(theirs.abs().max()))


@pytest.mark.parametrize("model_key", ["bnnet", "vit"])
def test_a_head_that_is_not_affine_runs_every_noisy_copy(model_key: str) -> None:
    """The BN network's GELU head and the ViT's blocks make the gradient depend on the input;
    without noise nothing is skipped either way (the copies are the plain input)."""
    model = frozen(make_bnnet() if model_key == "bnnet" else make_vit())
    method = prepared(model, noise_samples=4, noise_std=0.8)
    assert (method.copies, method.passes_per_image) == (4, 4)
    assert prepared(make_tiny(), noise_samples=4, noise_std=0.0).copies == 4
