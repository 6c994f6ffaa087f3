"""Every method in the registry against its reference (pytorch-grad-cam 1.5.7), on two
small CNNs and a small ViT, at batch sizes 1 and 4, after camx's usual finish
(bilinear upsampling, min-max). New methods in the registry are picked up here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import torch
import torchvision
from conftest import make_tiny
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods import BatchExplainer, MethodOptions, Setup, create, info, method_names
from cam_cli.methods.base import TargetLayer, to_feature_map
from cam_cli.models import Classifier
from cam_cli.probe import default_target, run_probe
from cam_cli.render import upsample_normalise

SIZE = 32
GAMMA = 0.7


class BNNet(nn.Module):
    """Conv-BN-ReLU(in place) x2, then GAP -> Linear -> GELU -> Linear: a non-linear head
    (so ShapleyCAM's Hessian term is not zero and CAM does not apply)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def make_bnnet() -> nn.Module:
    torch.manual_seed(3)
    model = BNNet()
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def make_vit() -> nn.Module:
    torch.manual_seed(5)
    model = torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    with torch.no_grad():  # torchvision starts the head at zero
        model.heads.head.weight.normal_(0, 0.5)
    return model.eval()


MODELS = {"tiny": lambda: make_tiny(), "bnnet": make_bnnet, "vit": make_vit}


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def target_of(model: nn.Module) -> TargetLayer:
    return default_target(run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE)))


def batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def ours(name: str, model: nn.Module, x: torch.Tensor, **kwargs: object) -> tuple[np.ndarray, torch.Tensor]:
    """camx's finished maps ``(N, SIZE, SIZE)`` and the explained classes."""
    aug = bool(kwargs.pop("aug_smooth", False))
    method = create(name, MethodOptions(finer_gamma=GAMMA, **kwargs))  # type: ignore[arg-type]
    target = None if not info(name).uses_layer else target_of(model)
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    method.prepare(Setup(probe, target, model, model, torch.device("cpu")))
    result = BatchExplainer(model, model, target, [method], aug_smooth=aug).explain(
        x, lambda logits: logits.argmax(1, keepdim=True)
    )
    maps = result.maps[name]
    finished = np.stack([upsample_normalise(maps[i], SIZE, SIZE)[0].numpy() for i in range(len(x))])
    return finished, result.classes_of(method)[:, 0]


def minmax(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / a.max() if a.max() > 0 else a


def reshape_for(model_key: str, target: TargetLayer):  # noqa: ANN201
    if model_key != "vit":
        return None

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return to_feature_map(t, target)

    return reshape


@contextlib.contextmanager
def sign_corrected_projection() -> Iterator[None]:
    """pytorch-grad-cam's eigen_smooth and Eigen-CAM with Seg-Eigen-CAM's sign correction (METHODS.md)."""
    import importlib

    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction as fixed

    names = ("base_cam", "eigen_cam", "eigen_grad_cam", "layer_cam", "hirescam", "grad_cam_elementwise")
    modules = [importlib.import_module(f"pytorch_grad_cam.{name}") for name in names]
    saved = [(m, m.get_2d_projection) for m in modules]
    for m, _ in saved:
        m.get_2d_projection = fixed
    try:
        yield
    finally:
        for m, original in saved:
            m.get_2d_projection = original


def reference(name: str, model_key: str, x: torch.Tensor, classes: torch.Tensor, **kwargs: object) -> np.ndarray:
    """The reference library's maps ``(N, SIZE, SIZE)`` for the same classes."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.base_cam import BaseCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = MODELS[model_key]().requires_grad_(True)
    target = target_of(frozen(MODELS[model_key]()))
    layer = model.get_submodule(target.name) if target is not None else None
    aug = bool(kwargs.get("aug_smooth", False))
    eigen = bool(kwargs.get("eigen_smooth", False))
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    reshape = reshape_for(model_key, target) if name != "fullgrad" else None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class SignCorrectedKPCA(pgc.KPCA_CAM):
        """pytorch-grad-cam's KPCA-CAM with Seg-Eigen-CAM's sign rule, as camx's Eigen-CAM (METHODS.md)."""

        def get_cam_image(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            projection = super().get_cam_image(*args, **kwargs)
            flip = np.abs(projection.min(axis=(1, 2))) > np.abs(projection.max(axis=(1, 2)))
            return np.where(flip[:, None, None], -projection, projection)

    with sdpa_kernel([SDPBackend.MATH]), sign_corrected_projection():
        if name == "finercam":
            with pgc.FinerCAM(model, [layer], reshape_transform=reshape) as cam:
                return cam(x, alpha=GAMMA, comparison_categories=[1], eigen_smooth=eigen)
        if name == "shapleycam" and model_key == "vit":
            if not aug:
                return shapley_by_hand(model, layer, target, x, classes, eigen)
            runs = []
            for flip in (False, True):
                for factor in (0.9, 1.0, 1.1):
                    xa = (x.flip(-1) if flip else x) * factor
                    run = shapley_by_hand(model, layer, target, xa, classes, eigen)
                    runs.append(run[:, :, ::-1] if flip else run)
            return np.mean(np.float32(runs), axis=0)
        if name == "ablationcam":
            ablation = zero_ablation(model_key)
            with pgc.AblationCAM(model, [layer], reshape_transform=reshape, ablation_layer=ablation) as cam:
                return cam(input_tensor=x, targets=targets, aug_smooth=aug, eigen_smooth=eigen)
        if name == "random":
            seed = int(kwargs.get("seed", 0))  # type: ignore[call-overload]

            class SeededRandom(BaseCAM):
                def get_cam_weights(self, input_tensor, target_layer, target_category, activations, grads):  # noqa: ANN001, ANN201
                    generator = torch.Generator().manual_seed(seed)
                    w = torch.rand(activations.shape[1], generator=generator, dtype=torch.float64)
                    return np.tile((w * 2 - 1).float().numpy(), (activations.shape[0], 1))

            cls = SeededRandom
        else:
            cls = {
                "gradcam": pgc.GradCAM,
                "gradcam++": pgc.GradCAMPlusPlus,
                "xgradcam": pgc.XGradCAM,
                "layercam": pgc.LayerCAM,
                "hirescam": pgc.HiResCAM,
                "gradcam-elementwise": pgc.GradCAMElementWise,
                "eigengradcam": pgc.EigenGradCAM,
                "shapleycam": pgc.ShapleyCAM,
                "fullgrad": pgc.FullGrad,
                "eigencam": pgc.EigenCAM,
                "segeigencam": pgc.SegEigenCAM,
                "kpcacam": SignCorrectedKPCA,
                "fem": pgc.FEM,
                "scorecam": pgc.ScoreCAM,
            }[name]
        layers = [] if name == "fullgrad" else [layer]
        with cls(model=model, target_layers=layers, reshape_transform=reshape) as cam:
            return cam(input_tensor=x, targets=targets, aug_smooth=aug, eigen_smooth=eigen)


def zero_ablation(model_key: str) -> nn.Module:
    """pytorch-grad-cam's ablation layer, setting the channel to 0 (camx's convention). Its own
    sets it to ``min - 1e7`` where the activation is not >= 0 (a ViT's), and its default
    ``AblationLayer`` reads token activations along the wrong axis (``AblationLayerVit`` is for those)."""
    from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

    if model_key != "vit":
        return AblationLayer()  # a ReLU's output: its minimum is 0, so it zeroes

    class ZeroAblationVit(AblationLayerVit):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
            output = self.activations.transpose(1, -1)
            for i in range(output.size(0)):
                output[i, self.indices[i], :] = 0
            return output.transpose(-1, 1)

    return ZeroAblationVit()


def shapley_by_hand(
    model: nn.Module, layer: nn.Module, target: TargetLayer, x: torch.Tensor, classes: torch.Tensor, eigen: bool
) -> np.ndarray:
    """pytorch-grad-cam's ShapleyCAM formula, for a token model (its class reads the
    activation before the reshape and fails there): w = mean(g - Hv / 2), ReLU(sum w A)."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    kept: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (activation,) = kept
    loss = logits.gather(1, classes.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(loss, activation, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, activation, grad_outputs=activation)
    a = to_feature_map(activation.detach(), target).numpy()
    weights = to_feature_map((grad - 0.5 * hvp).detach(), target).mean(dim=(2, 3)).numpy()
    weighted = weights[:, :, None, None] * a
    cam = get_2d_projection_with_sign_correction(weighted) if eigen else weighted.sum(axis=1)
    return scale_cam_image(scale_cam_image(np.maximum(cam, 0), (SIZE, SIZE)))


#: CAM's reference is torchcam (test_methods.py); the noisy and integrated methods' are at the end of this file,
#: RefineCAM's (several layers), DFF's (K concepts an image) and the guided ones' (pytorch-grad-cam's
#: GuidedBackpropReLUModel, which has no CAM interface) too
GUIDED = ("guided-backprop", "guided-gradcam")
OWN_REFERENCE = ("cam", "smoothgradcam++", "sscam", "iscam", "refinecam", "dff", *GUIDED, "sess", "legrad")
PGC_METHODS = [m for m in method_names() if m not in OWN_REFERENCE]
#: methods that read several layers at once: not run on one default layer here
MULTI_LAYER = ("refinecam",)
#: methods for vision transformers only (test_legrad.py)
VIT_ONLY = ("legrad",)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("name", PGC_METHODS)
def test_every_method_equals_its_reference(name: str, model_key: str, n: int) -> None:
    x = batch(n, seed=n)
    mine, classes = ours(name, frozen(MODELS[model_key]()), x)
    theirs = reference(name, model_key, x, classes)
    assert np.isfinite(mine).all()
    for i in range(n):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"{name} {model_key} image {i}")


SMOOTHED = [m for m in PGC_METHODS if info(m).aug_smooth]


@pytest.mark.parametrize("model_key", ["bnnet", "vit"])
@pytest.mark.parametrize("name", SMOOTHED)
def test_aug_smooth_equals_the_reference(name: str, model_key: str) -> None:
    x = batch(2, seed=7)
    mine, classes = ours(name, frozen(MODELS[model_key]()), x, aug_smooth=True)
    theirs = reference(name, model_key, x, classes, aug_smooth=True)
    for i in range(2):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"{name} {model_key} image {i}")


EIGEN = [m for m in PGC_METHODS if info(m).eigen_smooth]


@pytest.mark.parametrize("model_key", ["tiny", "vit"])
@pytest.mark.parametrize("name", EIGEN)
def test_eigen_smooth_equals_the_sign_corrected_reference(name: str, model_key: str) -> None:
    x = batch(2, seed=9)
    mine, classes = ours(name, frozen(MODELS[model_key]()), x, eigen_smooth=True)
    theirs = reference(name, model_key, x, classes, eigen_smooth=True)
    for i in range(2):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"{name} {model_key} image {i}")


@pytest.mark.parametrize("name", [m for m in method_names() if m not in MULTI_LAYER + VIT_ONLY])
def test_batch_size_does_not_change_any_method(name: str) -> None:
    model = frozen(make_bnnet() if name != "cam" else make_tiny())
    x = batch(5, seed=11)
    together, _ = ours(name, model, x)
    alone = np.concatenate([ours(name, model, x[i : i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_several_methods_in_one_pass_equal_each_alone() -> None:
    model = frozen(make_bnnet())
    x = batch(3, seed=13)
    own_passes = ("cam", "smoothgradcam++", "dff", *MULTI_LAYER, *VIT_ONLY)  # dff: a labelling pass of its own
    names = [m for m in method_names() if m not in own_passes and info(m).family != "perturbation"]
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    target = default_target(probe)
    methods = [create(m, MethodOptions(finer_gamma=GAMMA)) for m in names]
    for m in methods:
        m.prepare(Setup(probe, target, model, model, torch.device("cpu")))
    calls = []
    counting = lambda t: (calls.append(1), model(t))[1]  # noqa: E731
    result = BatchExplainer(counting, model, target, methods).explain(x, lambda lg: lg.argmax(1, keepdim=True))
    assert len(calls) == 4, "one forward for every layer method, one for each own pass (FullGrad, the guided two)"
    for name in names:
        alone, _ = ours(name, model, x)
        together = np.stack([upsample_normalise(result.maps[name][i], SIZE, SIZE)[0].numpy() for i in range(3)])
        np.testing.assert_allclose(together, alone, atol=1e-5, err_msg=name)


def test_shapleycam_differs_from_gradcam_where_the_head_is_not_linear() -> None:
    model = frozen(make_bnnet())
    x = batch(2, seed=3)
    shapley, _ = ours("shapleycam", model, x)
    grad, _ = ours("gradcam", model, x)
    assert np.abs(shapley - grad).max() > 1e-3


def test_class_agnostic_methods_give_one_map_whatever_the_target() -> None:
    model = frozen(make_bnnet())
    x = batch(2)
    target = target_of(model)
    for name in ("eigencam", "fem", "random"):
        result = BatchExplainer(model, model, target, [create(name)]).explain(x, lambda lg: lg.topk(3, dim=1).indices)
        assert result.maps[name].shape[1] == 1
        assert torch.equal(result.classes_of(create(name)), model(x).argmax(1, keepdim=True))


def test_random_is_reproducible_and_follows_the_seed() -> None:
    model = frozen(make_bnnet())
    x = batch(2)
    a, _ = ours("random", model, x, seed=0)
    b, _ = ours("random", model, x, seed=0)
    c, _ = ours("random", model, x, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_random_equals_the_reference_formula_with_another_seed() -> None:
    model = frozen(make_tiny())
    x = batch(2)
    mine, classes = ours("random", model, x, seed=42)
    theirs = reference("random", "tiny", x, classes, seed=42)
    for i in range(2):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4)


def test_cam_is_refused_in_prepare_with_the_method_named() -> None:
    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    with pytest.raises(ModelError, match=r"^cam: .*Linear -> GELU -> Linear"):
        create("cam").prepare(Setup(probe, default_target(probe), model, model, torch.device("cpu")))


# ----------------------------------------------- smoothgradcam++, sscam, iscam (torchcam 0.5.0)


def torchcam_maps(cls: type, model_key: str, x: torch.Tensor, classes: torch.Tensor, seed: int = 0,
                  **kwargs: object) -> np.ndarray:  # fmt: skip
    """torchcam's maps of ``cls`` ``(N, SIZE, SIZE)`` after camx's finish (bilinear, min-max); its
    noise comes from torch's global generator, seeded here; a ViT's tokens reshaped as camx does."""
    import torch.nn.functional as F

    model = frozen(MODELS[model_key]())
    target = target_of(model)
    if model_key == "vit":
        kwargs["reshape_transform"] = lambda t: to_feature_map(t, target)
    gradient = cls.__name__.startswith("Smooth") or issubclass(cls, _corrected_base())
    with cls(model, target.name, input_shape=(3, SIZE, SIZE), **kwargs) as cam:
        torch.manual_seed(seed)
        with contextlib.nullcontext() if gradient else torch.no_grad():
            model(x)
        maps = cam(class_idx=[int(c) for c in classes])[0].detach()
    up = F.interpolate(maps[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([minmax(m) for m in up])


def _corrected_base() -> type:
    from torchcam.methods import SmoothGradCAMpp

    return SmoothGradCAMpp


def corrected_smoothgradcampp() -> type:
    """torchcam's SmoothGradCAMpp with Grad-CAM++'s formula put right (docs/methods.md): the
    means of ``g``, ``g^2``, ``g^3`` over its noisy passes, ``a = g2 / (2 g2 + sum_ij(A) g3)``
    (torchcam: ``sum_ij(A g3)``), ``ReLU`` of the mean gradient (torchcam: the last sample's),
    and the plain input's activation in the map (torchcam: the last noisy pass's)."""

    class Corrected(_corrected_base()):  # type: ignore[misc]
        def _compute_smoothgrad_weights(self, class_idx, eps, **kwargs):  # noqa: ANN001, ANN003, ANN202, ARG002
            plain = [a.clone() for a in self.hook_a]
            sums = [[torch.zeros_like(a) for a in plain] for _ in range(3)]
            for _ in range(self.num_samples):
                noisy = self._input + self._distrib.sample(self._input.size())
                self._backprop(self.model(noisy.requires_grad_(True)), class_idx, **kwargs)
                for layer, g in enumerate(self.hook_g):
                    for p in range(3):
                        sums[p][layer] += g ** (p + 1)
            self.hook_a = plain
            weights = []
            for layer, a in enumerate(plain):
                g1, g2, g3 = (sums[p][layer] / self.num_samples for p in range(3))
                alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3 + 1e-6)
                alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
                weights.append((torch.relu(g1) * alpha).sum(dim=(2, 3)))
            return weights

    return Corrected


NOISY = {"smoothgradcam++": "gradcam++", "sscam": "scorecam"}


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("name", list(NOISY))
def test_smoothgradcam_and_sscam_without_noise_equal_gradcampp_and_scorecam(name: str, model_key: str, n: int) -> None:
    x = batch(n, seed=n)
    model = frozen(MODELS[model_key]())
    noiseless, _ = ours(name, model, x, noise_std=0.0, noise_samples=3)
    plain, _ = ours(NOISY[name], model, x)
    # the CNNs: bit for bit; the ViT's noisy passes run in batches of other sizes (2.4e-7)
    np.testing.assert_allclose(noiseless, plain, rtol=0, atol=0 if model_key != "vit" else 1e-6)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", list(MODELS))
def test_iscam_equals_torchcam(model_key: str, n: int) -> None:
    from torchcam.methods import ISCAM

    x = batch(n, seed=n)
    mine, classes = ours("iscam", frozen(MODELS[model_key]()), x)
    theirs = torchcam_maps(ISCAM, model_key, x, classes)
    np.testing.assert_allclose(mine, theirs, atol=1e-4)  # measured: 2.4e-7 (CNNs), 9.5e-7 (ViT)


def test_iscam_with_one_step_is_torchcams_scorecam() -> None:
    from torchcam.methods import ScoreCAM

    x = batch(2, seed=5)
    mine, classes = ours("iscam", frozen(make_bnnet()), x, noise_samples=1)
    np.testing.assert_allclose(mine, torchcam_maps(ScoreCAM, "bnnet", x, classes), atol=1e-4)


@pytest.mark.parametrize("name", ["smoothgradcam++", "sscam"])
def test_smoothgradcam_and_sscam_are_reproducible_and_follow_the_seed(name: str) -> None:
    model = frozen(make_vit())
    x = batch(2, seed=3)
    a, _ = ours(name, model, x, seed=0, noise_samples=2)
    b, _ = ours(name, model, x, seed=0, noise_samples=2)
    c, _ = ours(name, model, x, seed=1, noise_samples=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


#: (model, options) where the noise moves the mean map well away from the noiseless one
#: (by 18 and 36 times the tolerance's sigma), so that the comparison has power
SEEDED = {
    "sscam": ("vit", {"noise_samples": 8, "noise_std": 2.0}),
    "smoothgradcam++": ("bnnet", {"noise_samples": 4, "noise_std": 1.0}),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_smoothgradcam_and_sscam_mean_over_seeds_equals_the_references(name: str) -> None:
    """The mean map over 30 seeds of camx and of the reference (torchcam's SSCAM; torchcam's
    SmoothGradCAMpp corrected, whose own is 0.37 away here). Per pixel, the difference of two
    means of 30 independent draws has the standard deviation ``sqrt((var_camx + var_ref) / 30)``,
    measured from the draws: allow 5 of those (measured: at most 2.5)."""
    from torchcam.methods import SSCAM

    model_key, options = SEEDED[name]
    model = frozen(MODELS[model_key]())
    x = batch(2, seed=21)
    draws = 30
    mine = np.stack([ours(name, model, x, seed=s, **options)[0] for s in range(draws)])  # type: ignore[arg-type]
    classes = ours(name, model, x, seed=0, **options)[1]  # type: ignore[arg-type]
    cls = SSCAM if name == "sscam" else corrected_smoothgradcampp()
    ref_options = {"num_samples": options["noise_samples"], "std": options["noise_std"]}
    theirs = np.stack([torchcam_maps(cls, model_key, x, classes, seed=1000 + s, **ref_options) for s in range(draws)])
    sigma = np.sqrt((mine.var(axis=0) + theirs.var(axis=0)) / draws)
    difference = np.abs(mine.mean(axis=0) - theirs.mean(axis=0))
    assert (difference <= 5 * sigma + 1e-6).all(), float((difference / np.maximum(sigma, 1e-9)).max())
    noiseless, _ = ours(NOISY[name], model, x)
    assert (np.abs(mine.mean(axis=0) - noiseless) > 5 * sigma + 1e-6).any(), "the noise made no difference"


def test_smoothgradcam_sscam_and_iscam_with_gradcam_through_the_cli(image_dir, tiny_factory, tmp_path) -> None:  # noqa: ANN001
    import json

    from click.testing import CliRunner

    from cam_cli import rundir
    from cam_cli.cli import main

    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, "--weights", "NONE", "--device", "cpu",
            "-q", "--json", "--workers", "0", "--input-size", "32", "--batch-size", "4", "--seed", "7",
            "--method", "gradcam,smoothgradcam++,sscam,iscam",
            "--noise-samples", "3", "--noise-std", "0.5"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["done"] == 6 and summary["timings"]["extra_passes"] > 0
    records = rundir.load_manifest(out / "manifest.jsonl")
    assert len(records) == 24
    for key, method in records:
        assert records[(key, method)]["status"] == "ok"
        assert (out / f"{key}.{method}.npy").is_file() and (out / f"{key}.{method}.jpg").is_file()
    for method in ("smoothgradcam++", "sscam"):
        record = records[("a.jpg", method)]
        assert (record["noise_samples"], record["noise_std"], record["seed"]) == (3, 0.5, 7)
    assert records[("a.jpg", "iscam")]["noise_samples"] == 3 and "noise_std" not in records[("a.jpg", "iscam")]
    assert "noise_samples" not in records[("a.jpg", "gradcam")]
    again = CliRunner().invoke(main, [*args[:3], str(tmp_path / "again"), *args[4:]])
    assert again.exit_code == 0, again.output
    for method in ("smoothgradcam++", "sscam", "iscam"):
        np.testing.assert_array_equal(
            np.load(out / f"a.jpg.{method}.npy"), np.load(tmp_path / "again" / f"a.jpg.{method}.npy")
        )


@pytest.mark.parametrize(("name", "per_image"), [("smoothgradcam++", 3), ("sscam", 3 * 12), ("iscam", 3 * 12)])
def test_smoothgradcam_sscam_and_iscam_fill_full_batches_count_their_passes_and_stop(name: str, per_image: int) -> None:
    import threading

    from cam_cli.methods.base import Stopped

    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    method = create(name, MethodOptions(noise_samples=3))
    method.prepare(Setup(probe, default_target(probe), model, model, torch.device("cpu")))
    sizes: list[int] = []
    counting = lambda t: (sizes.append(len(t)), model(t))[1]  # noqa: E731
    explainer = BatchExplainer(counting, model, default_target(probe), [method])
    passes: list[int] = []
    explainer.batch_size, explainer.on_passes = 4, passes.append
    explainer.explain(batch(3), lambda lg: lg.argmax(1, keepdim=True))
    total = 3 * per_image
    assert sizes == [3] + [4] * (total // 4) + ([total % 4] if total % 4 else []), "the images' copies mixed"
    assert sum(passes) == total
    stop = threading.Event()
    explainer.stop, explainer.on_passes = stop, lambda n: stop.set()
    with pytest.raises(Stopped):
        explainer.explain(batch(3), lambda lg: lg.argmax(1, keepdim=True))


# ----------------------------------------------- refinecam (pytorch-grad-cam's RefineCAM, several layers)

REFINE_LAYERS = {
    "tiny": ["features.1", "features.3"],
    "bnnet": ["features.2", "features.5"],
    "vit": ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1.ln_1"],
}


def refine_reference(model_key: str, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's RefineCAM (its default base, Grad-CAM++) on the same layers and classes."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = MODELS[model_key]().requires_grad_(True)
    layers = [model.get_submodule(name) for name in REFINE_LAYERS[model_key]]
    reshape = reshape_for(model_key, target_of(frozen(MODELS[model_key]())))
    with sdpa_kernel([SDPBackend.MATH]):
        return pgc.RefineCAM(model, layers, reshape)(x, [ClassifierOutputTarget(int(c)) for c in classes])


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", list(MODELS))
def test_refinecam_equals_pytorch_grad_cams(model_key: str, n: int) -> None:
    import cam_cli

    x = batch(n, seed=n + 30)
    result = cam_cli.explain(frozen(MODELS[model_key]()), x, methods="refinecam", layer=REFINE_LAYERS[model_key])
    mine = result["refinecam"]
    theirs = refine_reference(model_key, x, mine.classes)
    assert mine.maps.shape == (n, SIZE, SIZE) and float(mine.maps.std()) > 0.05  # not flat
    for i in range(n):
        np.testing.assert_allclose(mine.maps[i].numpy(), minmax(theirs[i]), atol=1e-4, err_msg=f"{model_key} {i}")


def test_refinecam_takes_one_forward_and_one_backward_for_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from cam_cli.probe import resolve_targets

    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    targets = resolve_targets(probe, ",".join(REFINE_LAYERS["bnnet"]))
    methods = [create("refinecam"), create("gradcam")]
    for method in methods:
        method.prepare(Setup(probe, targets[0], model, model, torch.device("cpu"), tuple(targets)))
    forwards: list[int] = []
    backwards: list[int] = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (backwards.append(1), grad(*a, **k))[1])
    counting = lambda t: (forwards.append(1), model(t))[1]  # noqa: E731
    result = BatchExplainer(counting, model, targets, methods).explain(batch(3), lambda lg: lg.argmax(1, keepdim=True))
    assert result.maps["refinecam"].shape == (3, 1, SIZE, SIZE)
    assert len(forwards) == 1 and len(backwards) == 1, "both layers and both methods from one pass each way"


def test_refinecam_is_the_product_of_its_layers_and_needs_two() -> None:
    import cam_cli

    model = frozen(make_bnnet())
    x = batch(2, seed=6)
    both = cam_cli.explain(model, x, methods="refinecam", layer=REFINE_LAYERS["bnnet"])["refinecam"].maps
    alone = [cam_cli.explain(model, x, methods="gradcam++", layer=name)["gradcam++"].maps
             for name in REFINE_LAYERS["bnnet"]]  # fmt: skip
    product = alone[0] * alone[1]
    low = product.amin(dim=(1, 2), keepdim=True)
    expected = (product - low) / (product.amax(dim=(1, 2), keepdim=True) - low)
    # each layer's map is min-maxed at the input's size, as camx finishes Grad-CAM++'s (same size here)
    np.testing.assert_allclose(both.numpy(), expected.numpy(), atol=1e-5)
    with pytest.raises(ModelError, match="refinecam .* two or more with --layer a,b,c"):
        cam_cli.explain(model, x, methods="refinecam")


def test_refinecam_through_the_cli_writes_what_the_manifest_names_and_resumes(image_dir, tiny_factory,
                                                                             tmp_path) -> None:  # noqa: ANN001  # fmt: skip
    import json

    from click.testing import CliRunner

    from cam_cli import rundir
    from cam_cli.cli import main

    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, "--weights", "NONE", "--device", "cpu",
            "-q", "--json", "--workers", "0", "--input-size", "32", "--method", "refinecam,gradcam",
            "--layer", "features.1,features.3", "--target", "top2"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["done"] == 6
    records = rundir.load_manifest(out / "manifest.jsonl")
    assert len(records) == 12
    named = set()
    for record in records.values():
        assert record["status"] == "ok" and record["layer"] == "features.1,features.3"
        assert len(record["targets"]) == 2
        named |= {t[k] for t in record["targets"] for k in ("overlay", "map")}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl"}
    assert written == named
    assert np.load(out / "a.jpg.refinecam.top1.npy").max() == 1
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["done"], summary["skipped"]) == (0, 6)
    one = CliRunner().invoke(main, [*args[:-4], "--method", "refinecam", "--layer", "features.3"])
    assert one.exit_code == 1 and "two or more with --layer a,b,c" in one.stderr


# ----------------------------------------------- dff (pytorch-grad-cam's DeepFeatureFactorization, per image)


def dff_reference(model_key: str, x: torch.Tensor, concepts: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """pytorch-grad-cam's DFF run on each image alone (it factorises a batch jointly), its concepts
    labelled by the model's head and put in camx's order (top class probability, highest first):
    maps ``(N, C, SIZE, SIZE)``, classes and scores ``(N, C)``."""
    from pytorch_grad_cam import DeepFeatureFactorization

    model = MODELS[model_key]()
    head = model.fc if model_key == "tiny" else model.head
    maps, classes, scores = [], [], []
    for i in range(len(x)):
        dff = DeepFeatureFactorization(model, model.features, computation_on_concepts=head)
        _, explanations, outputs = dff(x[i : i + 1], concepts)
        top = torch.softmax(torch.from_numpy(outputs), dim=-1).max(dim=-1)
        order = torch.argsort(top.values, descending=True, stable=True)
        maps.append(explanations[0][order.numpy()])
        classes.append(top.indices[order])
        scores.append(top.values[order])
    return np.stack(maps), torch.stack(classes), torch.stack(scores)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", ["tiny", "bnnet"])
def test_dff_equals_pytorch_grad_cams_concepts_image_by_image(model_key: str, n: int) -> None:
    import cam_cli

    x = batch(n, seed=n + 40)
    mine = cam_cli.explain(frozen(MODELS[model_key]()), x, methods="dff", concepts=3)["dff"]
    maps, classes, scores = dff_reference(model_key, x, 3)
    assert mine.maps.shape == (n, 3, SIZE, SIZE)
    assert torch.equal(mine.classes, classes)
    np.testing.assert_allclose(mine.scores.numpy(), scores.numpy(), atol=1e-5)
    for i in range(n):
        for c in range(3):
            np.testing.assert_allclose(mine.maps[i, c].numpy(), minmax(maps[i, c]), atol=1e-4, err_msg=f"{i} {c}")


def test_dff_refuses_tokens_and_several_layers() -> None:
    import cam_cli

    with pytest.raises(ModelError, match="dff .*tokens"):
        cam_cli.explain(frozen(make_vit()), batch(1), methods="dff")
    with pytest.raises(ModelError, match="dff factorises one layer"):
        cam_cli.explain(frozen(make_bnnet()), batch(1), methods="dff", layer=REFINE_LAYERS["bnnet"])


def test_dff_through_the_cli_writes_a_map_per_concept_and_resumes(image_dir, tiny_factory, tmp_path) -> None:  # noqa: ANN001
    import json

    from click.testing import CliRunner

    from cam_cli import rundir
    from cam_cli.cli import main

    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, "--weights", "NONE", "--device", "cpu",
            "-q", "--json", "--workers", "0", "--input-size", "32", "--method", "dff,gradcam",
            "--concepts", "3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["done"] == 6
    records = rundir.load_manifest(out / "manifest.jsonl")
    assert len(records) == 12
    named = set()
    for (_, method), record in records.items():
        assert record["status"] == "ok"
        assert len(record["targets"]) == (3 if method == "dff" else 1)
        named |= {t[k] for t in record["targets"] for k in ("overlay", "map")}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl"}
    assert written == named
    line = records[("a.jpg", "dff")]
    assert line["concepts"] == 3 and line["class_agnostic"] is True
    assert sorted(t["concept"] for t in line["targets"]) == [0, 1, 2]
    first = line["targets"][0]
    assert (line["class_index"], line["score"]) == (first["class_index"], first["score"])
    assert first["concept_classes"][0] == first["class_index"] and len(first["concept_scores"]) == 3
    assert [t["score"] for t in line["targets"]] == sorted((t["score"] for t in line["targets"]), reverse=True)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["done"], summary["skipped"]) == (0, 6)
    more = CliRunner().invoke(main, [*args[:-2], "--concepts", "2"])  # other settings: redone
    assert more.exit_code == 0, more.output
    assert json.loads(more.stdout.splitlines()[-1])["done"] == 6
    assert len(rundir.load_manifest(out / "manifest.jsonl")[("a.jpg", "dff")]["targets"]) == 2


# ----------------------------------------------- guided-backprop, guided-gradcam (pytorch-grad-cam 1.5.7)


def guided(name: str, model: nn.Module, x: torch.Tensor, choose=None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:  # noqa: ANN001
    """camx's classes ``(N, R)``, finished maps ``(N, R, SIZE, SIZE)`` and 3-channel images
    ``(N, R, 3, SIZE, SIZE)`` of a guided method, through the batch explainer."""
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    target = default_target(probe) if info(name).uses_layer else None
    method = create(name)
    method.prepare(Setup(probe, target, model, model, torch.device("cpu")))
    result = BatchExplainer(model, model, target, [method]).explain(
        x, choose or (lambda logits: logits.argmax(1, keepdim=True))
    )
    maps = result.maps[name]
    finished = np.stack([upsample_normalise(m, SIZE, SIZE).numpy() for m in maps])
    return result.classes, finished, result.gradients[name].numpy()


def pgc_guided(name: str, model_key: str, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's guided gradient ``(N, 3, SIZE, SIZE)`` (its model takes one image at a
    time), times its Grad-CAM map of the same class and layer for guided-gradcam."""
    from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = MODELS[model_key]().requires_grad_(True)
    backprop = GuidedBackpropReLUModel(model, device="cpu")
    images = np.stack([backprop(x[i : i + 1].clone(), target_category=int(c)) for i, c in enumerate(classes)])
    images = images.transpose(0, 3, 1, 2)
    if name == "guided-gradcam":
        fresh = MODELS[model_key]().requires_grad_(True)
        layer = fresh.get_submodule(target_of(frozen(MODELS[model_key]())).name)
        with GradCAM(fresh, [layer]) as cam:
            maps = cam(x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        images = images * maps[:, None]
    return images


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", ["tiny", "bnnet"])
@pytest.mark.parametrize("name", GUIDED)
def test_guided_methods_equal_pytorch_grad_cams_guided_backprop(name: str, model_key: str, n: int) -> None:
    x = batch(n, seed=n)
    classes, maps, images = guided(name, frozen(MODELS[model_key]()), x)
    theirs = pgc_guided(name, model_key, x, classes[:, 0])
    # the gradients are ~1e-4 here: 1e-4 of their largest value (measured: 2e-7 of it)
    scale = np.abs(theirs).max()
    assert scale > 0 and np.abs(images[:, 0] - theirs).max() <= 1e-4 * scale, np.abs(images[:, 0] - theirs).max()
    saliency = np.abs(theirs).max(axis=1)  # Simonyan et al.'s convention, then camx's finish
    for i in range(n):
        np.testing.assert_allclose(maps[i, 0], minmax(saliency[i]), atol=1e-4, err_msg=f"{name} image {i}")
        assert maps[i, 0].max() == 1.0


def test_guided_gradcam_is_guided_backprop_times_the_gradcam_map() -> None:
    """The identity behind it, with camx's own Grad-CAM: upsampled and min-max'ed at the input size
    (pytorch-grad-cam's scale: min-max at the layer's resolution, resize, min-max again)."""
    import torch.nn.functional as F

    model = frozen(make_bnnet())
    x = batch(3, seed=8)
    _, _, backprop = guided("guided-backprop", model, x)
    _, _, product = guided("guided-gradcam", model, x)
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    cam = BatchExplainer(model, model, default_target(probe), [create("gradcam")]).explain(
        x, lambda lg: lg.argmax(1, keepdim=True)
    )
    low = torch.as_tensor(np.stack([minmax(m) for m in cam.maps["gradcam"][:, 0].numpy()]))
    up = F.interpolate(low[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
    up = np.stack([minmax(m) for m in up])
    expected = backprop[:, 0] * up[:, None]
    np.testing.assert_allclose(product[:, 0], expected, rtol=0, atol=1e-6 * np.abs(backprop).max())


def test_guided_methods_give_one_map_per_target_class() -> None:
    model = frozen(make_bnnet())
    x = batch(2, seed=4)
    for name in GUIDED:
        classes, maps, images = guided(name, model, x, lambda lg: lg.topk(3, dim=1).indices)
        assert maps.shape == (2, 3, SIZE, SIZE) and images.shape == (2, 3, 3, SIZE, SIZE)
        for r in range(3):
            fixed = classes[:, r : r + 1]
            _, alone, alone_images = guided(name, model, x, lambda lg, fixed=fixed: fixed)
            np.testing.assert_allclose(maps[:, r], alone[:, 0], atol=1e-6, err_msg=f"{name} rank {r}")
            np.testing.assert_allclose(images[:, r], alone_images[:, 0], rtol=1e-5, atol=1e-12)
        assert np.abs(maps[:, 0] - maps[:, 1]).max() > 1e-3, "another class, another map"


def model_state(model: nn.Module) -> list[tuple[object, ...]]:
    """Everything guided backpropagation might leave changed on a model."""
    return [
        (name, type(m), getattr(m, "inplace", None), len(m._forward_hooks), len(m._forward_pre_hooks),
         len(m._backward_hooks), len(m._backward_pre_hooks))
        for name, m in model.named_modules()
    ] + [(name, p.requires_grad, p.grad) for name, p in model.named_parameters()]  # fmt: skip


def test_guided_methods_leave_the_model_as_it_was_also_on_error() -> None:
    model = frozen(make_bnnet())  # its ReLUs are in place
    before = model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch(2, seed=6)
    for name in GUIDED:
        guided(name, model, x)
        assert model_state(model) == before

        def failing(t: torch.Tensor) -> torch.Tensor:
            model(t)
            raise RuntimeError("boom")

        probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
        method = create(name)
        method.prepare(Setup(probe, default_target(probe), model, model, torch.device("cpu")))
        with pytest.raises(RuntimeError, match="boom"):
            BatchExplainer(failing, model, default_target(probe), [method]).explain(x, lambda lg: lg.argmax(1)[:, None])
        assert model_state(model) == before
        assert torch._C._len_torch_function_stack() == 0, "the guided mode was left on"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # and its backward is the plain one again: as a fresh copy's
    xg = x.clone().requires_grad_(True)
    (mine,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    xf = x.clone().requires_grad_(True)
    (fresh,) = torch.autograd.grad(frozen(make_bnnet())(xf)[:, 0].sum(), xf)
    assert torch.equal(mine, fresh)


class FunctionalNet(nn.Module):
    """The tiny model's layers with its ReLUs called as functions, in place and not."""

    def __init__(self, modules: nn.Module) -> None:
        super().__init__()
        self.net = modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.features
        x = torch.nn.functional.relu(f[0](x), inplace=True)
        x = f[2](x).relu_()
        return self.net.fc(torch.flatten(self.net.pool(x), 1))


def test_guided_relus_reach_functional_and_in_place_relus() -> None:
    tiny = frozen(make_tiny())
    functional = frozen(FunctionalNet(make_tiny()))
    x = batch(2, seed=10)
    _, maps, images = guided("guided-backprop", tiny, x)
    _, f_maps, f_images = guided("guided-backprop", functional, x)
    np.testing.assert_allclose(f_images, images, rtol=0, atol=1e-7 * np.abs(images).max())
    xg = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(tiny(xg).gather(1, tiny(x).argmax(1, keepdim=True)).sum(), xg)
    assert np.abs(images[:, 0] - plain.numpy()).max() > 0.1 * np.abs(plain.numpy()).max(), "nothing was guided"


@pytest.mark.parametrize("name", GUIDED)
def test_guided_methods_refuse_the_vit_and_the_smoothing_in_one_line(name: str) -> None:
    from cam_cli.errors import CamxError
    from cam_cli.jobs.explain.session import check_methods

    with pytest.raises(ModelError) as raised:
        guided(name, frozen(make_vit()), batch(1))
    message = str(raised.value)
    assert message.startswith(f"{name}: the model calls no ReLU") and "GELU" in message and "\n" not in message
    for aug, eigen in ((True, False), (False, True)):
        with pytest.raises(CamxError, match=f"does not apply to {name}; run those without it"):
            check_methods(name, None, aug, eigen)


def test_guided_picture_is_pytorch_grad_cams_deprocess_image() -> None:
    from pytorch_grad_cam.utils.image import deprocess_image

    from cam_cli.render import gradient_picture

    _, _, images = guided("guided-backprop", frozen(make_bnnet()), batch(1, seed=2))
    gradient = images[0, 0]
    theirs = deprocess_image(gradient.transpose(1, 2, 0))  # RGB
    mine = gradient_picture(gradient, SIZE, SIZE)  # BGR, for OpenCV's encoders
    assert np.abs(mine[:, :, ::-1].astype(int) - theirs.astype(int)).max() <= 1  # float rounding at a level's edge
    assert gradient_picture(gradient, 45, 67).shape == (45, 67, 3)


def test_guided_methods_with_gradcam_through_the_cli(image_dir, tiny_factory, tmp_path) -> None:  # noqa: ANN001
    import json

    from click.testing import CliRunner

    from cam_cli import rundir
    from cam_cli.cli import main
    from cam_cli.render import gradient_picture

    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, "--weights", "NONE", "--device", "cpu",
            "-q", "--json", "--workers", "0", "--input-size", "32", "--batch-size", "4", "--format", "png",
            "--method", "gradcam,guided-backprop,guided-gradcam", "--target", "top2"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["done"] == 6
    records = rundir.load_manifest(out / "manifest.jsonl")
    assert len(records) == 18
    named = {"manifest.jsonl"}
    flat: set[tuple[str, str, int]] = set()
    for record in records.values():
        key, method = record["key"], record["method"]
        assert record["status"] == "ok"
        assert len(record["targets"]) == 2
        for rank, entry in enumerate(record["targets"], start=1):
            stem = f"{key}.{method}.top{rank}"
            assert (entry["overlay"], entry["map"]) == (f"{stem}.png", f"{stem}.npy")
            heat = np.load(out / entry["map"])
            assert heat.shape == (record["height"], record["width"])
            assert heat.max() == 1.0 or (entry.get("flat") and heat.max() == 0), stem
            if entry.get("flat"):
                flat.add((key, method, rank))
            named |= {entry["overlay"], entry["map"]}
            if method == "gradcam":
                assert "gradient" not in entry and "gradient" not in record
                continue
            assert entry["gradient"] == f"{stem}.grad.npy"
            gradient = np.load(out / entry["gradient"])
            assert gradient.shape == (3, 32, 32) and gradient.dtype == np.float32
            named.add(entry["gradient"])
            picture = cv2.imread(str(out / entry["overlay"]))
            np.testing.assert_array_equal(picture, gradient_picture(gradient, record["height"], record["width"]))
        assert record.get("gradient") == record["targets"][0].get("gradient")
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert written == named, "a file no line names, or a line's missing file"
    # a flat (all-negative) Grad-CAM map makes its Guided Grad-CAM flat too; guided backprop never is
    assert {(k, r) for k, m, r in flat if m == "gradcam"} == {(k, r) for k, m, r in flat if m == "guided-gradcam"}
    assert not any(m == "guided-backprop" for _, m, _ in flat)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["done"], summary["skipped"]) == (0, 6), "the resume redid something"
    (out / "a.jpg.guided-gradcam.top2.grad.npy").unlink()
    redo = json.loads(CliRunner().invoke(main, args).stdout.splitlines()[-1])
    assert (redo["done"], redo["skipped"]) == (1, 5) and (out / "a.jpg.guided-gradcam.top2.grad.npy").is_file()
    evaluated = CliRunner().invoke(main, ["evaluate", str(out), "-q", "--device", "cpu", "--workers", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    scored = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["method"] for line in scored} >= {"gradcam", "guided-backprop", "guided-gradcam"}


def test_guided_images_come_back_from_the_api() -> None:
    import cam_cli

    model = frozen(make_bnnet())
    x = batch(3, seed=12)
    result = cam_cli.explain(model, x, methods="gradcam,guided-backprop,guided-gradcam", target="top2")
    assert result["gradcam"].gradients is None
    _, maps, images = guided("guided-backprop", model, x, lambda lg: lg.topk(2, dim=1).indices)
    assert result["guided-backprop"].gradients.shape == (3, 2, 3, SIZE, SIZE)
    np.testing.assert_allclose(result["guided-backprop"].gradients.numpy(), images, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(result["guided-backprop"].maps.numpy(), maps, atol=1e-6)
    assert result["guided-gradcam"].maps.shape == (3, 2, SIZE, SIZE)


class Relu6Net(nn.Module):
    """A mobile-style CNN: its only activation is ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU6(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.mark.parametrize("name", GUIDED)
def test_guided_methods_refuse_a_model_without_relus_naming_what_it_uses(name: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(ModelError, match=f"{name}: the model calls no ReLU .*ReLU6"):
        guided(name, frozen(Relu6Net().eval()), batch(1))
