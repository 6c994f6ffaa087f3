"""The public Python face: ``cam_cli.explain`` and ``cam_cli.load_model``, against
pytorch-grad-cam (1.5.7) and against the CLI's own path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_method_parity import MODELS, SIZE, batch, minmax, reference, sign_corrected_projection
from torch import nn

import cam_cli
from cam_cli import api
from cam_cli.errors import CamxError, InputError, ModelError
from cam_cli.models import load_classifier

PIXELS = 64  # resnet18's layer3 is 4x4 and layer4 2x2 at this size


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    """A seeded random torchvision resnet18 in eval mode, parameters requiring grad (as a user's model)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def images(n: int, seed: int = 1, height: int = PIXELS, width: int = PIXELS) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def theirs(name: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's maps ``(N, H, W)`` of ``classes`` ``(N,)`` at ``layer``."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
        "scorecam": pgc.ScoreCAM,
    }[name]
    with sign_corrected_projection(), cls(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def assert_matches(mine: torch.Tensor, reference_maps: np.ndarray, atol: float = 1e-4) -> None:
    """Each of our maps ``(N, H, W)`` against the reference's, min-max'ed exactly (the reference
    divides by ``max - min + 1e-7``, which shifts maps of small range)."""
    assert mine.shape == reference_maps.shape
    for i in range(len(mine)):
        np.testing.assert_allclose(mine[i].numpy(), minmax(reference_maps[i]), atol=atol, err_msg=f"image {i}")


RESNET_METHODS = ["gradcam", "gradcam++", "layercam", "eigencam", pytest.param("scorecam", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", RESNET_METHODS)
def test_resnet18_equals_pytorch_grad_cam_at_the_default_layer(resnet: nn.Module, name: str) -> None:
    x = images(1 if name == "scorecam" else 2)  # Score-CAM: a forward pass per channel (512)
    result = cam_cli.explain(resnet, x, methods=name)[name]
    assert result.maps.shape == (len(x), PIXELS, PIXELS)
    assert_matches(result.maps, theirs(name, resnet, resnet.layer4[-1], x, result.classes))


def test_a_named_layer_is_the_one_explained(resnet: nn.Module) -> None:
    x = images(2, seed=2)
    at_layer3 = cam_cli.explain(resnet, x, methods="gradcam,layercam", layer="layer3")
    for name, result in at_layer3.items():
        assert_matches(result.maps, theirs(name, resnet, resnet.layer3, x, result.classes))
    default = cam_cli.explain(resnet, x)["gradcam"]
    assert not torch.allclose(default.maps, at_layer3["gradcam"].maps, atol=1e-2)


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "layercam", "xgradcam", "eigencam", "scorecam"])
@pytest.mark.parametrize("model_key", ["tiny", "bnnet"])
def test_each_method_equals_pytorch_grad_cam_on_small_models(name: str, model_key: str) -> None:
    x = batch(3)
    result = cam_cli.explain(MODELS[model_key](), x, methods=name)[name]
    assert result.maps.shape == (3, SIZE, SIZE)
    assert_matches(result.maps, reference(name, model_key, x, result.classes))


def test_several_methods_from_one_call_equal_one_call_each() -> None:
    x = batch(4, seed=3)
    together = cam_cli.explain(MODELS["bnnet"](), x, methods="gradcam,eigencam,layercam,scorecam")
    assert list(together) == ["gradcam", "eigencam", "layercam", "scorecam"]
    for name, maps in together.items():
        alone = cam_cli.explain(MODELS["bnnet"](), x, methods=[name])[name]
        torch.testing.assert_close(maps.maps, alone.maps, atol=1e-5, rtol=0)
        assert torch.equal(maps.classes, alone.classes)


def test_chunks_of_batch_size_give_the_maps_of_one_pass() -> None:
    x = batch(5, seed=4)
    whole = cam_cli.explain(MODELS["bnnet"](), x, methods="gradcam,scorecam")
    chunked = cam_cli.explain(MODELS["bnnet"](), x, methods="gradcam,scorecam", batch_size=2)
    for name in whole:
        torch.testing.assert_close(chunked[name].maps, whole[name].maps, atol=1e-5, rtol=0)
        assert torch.equal(chunked[name].classes, whole[name].classes)


def test_maps_classes_and_scores_are_what_the_cli_records() -> None:
    model = MODELS["tiny"]()
    x = batch(2)
    result = cam_cli.explain(model, x)["gradcam"]
    with torch.no_grad():
        logits = model(x)
    assert result.classes.dtype == torch.int64 and result.scores.dtype == result.maps.dtype == torch.float32
    assert torch.equal(result.classes, logits.argmax(1))
    torch.testing.assert_close(result.scores, logits.softmax(1).gather(1, result.classes[:, None])[:, 0])
    for m in result.maps:
        assert float(m.min()) == 0.0 and float(m.max()) == 1.0


def test_maps_are_at_the_inputs_size_when_it_is_not_square() -> None:
    x = images(2, height=32, width=48)
    result = cam_cli.explain(MODELS["tiny"](), x, methods="gradcam,eigencam")
    assert {tuple(r.maps.shape) for r in result.values()} == {(2, 32, 48)}


def test_a_fixed_class_and_top_k_match_pytorch_grad_cam() -> None:
    x = batch(2)
    fixed = cam_cli.explain(MODELS["tiny"](), x, target=3)["gradcam"]
    assert fixed.classes.tolist() == [3, 3] and fixed.maps.shape == (2, SIZE, SIZE)
    assert_matches(fixed.maps, reference("gradcam", "tiny", x, fixed.classes))
    top = cam_cli.explain(MODELS["tiny"](), x, methods="gradcam,eigencam", target="top2")
    assert top["gradcam"].maps.shape == (2, 2, SIZE, SIZE) and top["gradcam"].classes.shape == (2, 2)
    assert top["eigencam"].maps.shape == (2, 1, SIZE, SIZE)  # not class-specific: the top-1 class only
    for k in range(2):
        classes = top["gradcam"].classes[:, k]
        assert_matches(top["gradcam"].maps[:, k], reference("gradcam", "tiny", x, classes))
    assert torch.all(top["gradcam"].scores[:, 0] >= top["gradcam"].scores[:, 1])


def test_a_class_name_from_load_models_labels(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nfox\n")
    model = cam_cli.load_model("resnet18", weights="NONE", num_classes=3, labels=labels)
    result = cam_cli.explain(model, images(1), target="dog")["gradcam"]
    assert result.classes.tolist() == [1]
    with pytest.raises(ModelError, match="not a class of this model"):
        cam_cli.explain(model, images(1), target="dgo")


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MODELS["tiny"]()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.inner(x), "other": x.mean()}


def test_a_model_returning_a_dict_with_output_key() -> None:
    wrapped = DictOutput()
    x = batch(2)
    mine = cam_cli.explain(wrapped, x, output_key="scores")["gradcam"]
    plain = cam_cli.explain(wrapped.inner, x)["gradcam"]
    torch.testing.assert_close(mine.maps, plain.maps)
    with pytest.raises(ModelError, match="output-key"):
        cam_cli.explain(wrapped, x)


class PartlyFrozen(nn.Module):
    """A model in training mode with one BatchNorm kept in eval mode and one frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MODELS["bnnet"]().train().requires_grad_(True)
        self.net.features[1].eval()
        self.net.features[0].weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("model_key", ["bnnet", "vit"])
def test_the_model_is_left_as_it_was(model_key: str) -> None:
    model = PartlyFrozen() if model_key == "bnnet" else MODELS["vit"]().train()
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cam_cli.explain(model, batch(2), methods="gradcam,scorecam,eigencam")
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # the probe's backward pass left nothing
    for key, value in model.state_dict().items():  # BatchNorm's running statistics untouched
        assert torch.equal(value, state[key]), key
    for module in model.modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
        assert not any(hooks)


def test_hooks_are_removed_when_a_method_fails() -> None:
    model = MODELS["vit"]()
    with pytest.raises(ModelError):
        cam_cli.explain(model, batch(1), methods="cam")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]
)
def test_inputs_of_the_wrong_shape_or_type_get_one_clear_error(bad: torch.Tensor) -> None:
    with pytest.raises(InputError, match="inputs must be"):
        cam_cli.explain(MODELS["tiny"](), bad)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"methods": "gradcam,nosuchcam"}, CamxError, "nosuchcam"),
        ({"methods": "fullgrad", "layer": "features.0"}, CamxError, "layer does not apply to fullgrad"),
        ({"layer": "no_such_layer"}, ModelError, "unknown layer"),
        ({"target": 99}, ModelError, "out of range"),
        ({"target": 1.5}, CamxError, "target must be"),
        ({"precision": "fp8"}, CamxError, "unknown precision"),
        ({"batch_size": 0}, CamxError, "batch_size"),
        ({"methods": "gradcam,eigencam", "eigen_smooth": True}, CamxError, "does not apply to eigencam"),
    ],
)
def test_bad_arguments_get_one_line_errors(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        cam_cli.explain(MODELS["tiny"](), batch(1), **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_a_model_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(InputError, match="torch.nn.Module"):
        cam_cli.explain(lambda x: x, batch(1))  # type: ignore[arg-type]


def test_cam_on_a_head_it_cannot_use_names_the_reason() -> None:
    with pytest.raises(ModelError):
        cam_cli.explain(MODELS["vit"](), batch(1), methods="cam")


def test_the_device_option_runs_there_and_puts_the_model_back() -> None:
    model = MODELS["tiny"]()
    result = cam_cli.explain(model, batch(2), device="cpu")["gradcam"]
    assert result.maps.device.type == "cpu"
    assert next(model.parameters()).device.type == "cpu"


def test_cuda_runs_float32_convolutions_in_ieee_float32_and_restores_the_setting() -> None:
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with api._ieee_fp32(torch.device("cuda")):  # only flags: no GPU needed
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with api._ieee_fp32(torch.device("cpu")):
        assert conv.fp32_precision == before


def test_load_model_gives_what_the_cli_loads(resnet: nn.Module) -> None:
    mine = cam_cli.load_model("resnet18", weights="NONE", input_size=PIXELS)
    cli = load_classifier("resnet18", "NONE", input_size=PIXELS)
    assert (mine.input_size, mine.mean, mine.std, mine.categories) == (
        cli.input_size,
        cli.mean,
        cli.std,
        cli.categories,
    )
    for a, b in zip(mine.module.state_dict().values(), cli.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert type(mine.module) is type(resnet) and not mine.module.training
    result = cam_cli.explain(mine, images(1), methods="cam,gradcam")
    assert result["cam"].maps.shape == (1, PIXELS, PIXELS)
    torch.testing.assert_close(result["cam"].maps, result["gradcam"].maps, atol=1e-5, rtol=0)  # GAP + linear


def test_import_cam_cli_does_not_import_torch() -> None:
    code = "import sys, cam_cli; cam_cli.__version__; assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert {"explain", "load_model", "MethodMaps"} <= set(dir(cam_cli))
    for public in (cam_cli.explain, cam_cli.load_model):
        assert public.__doc__ and "Example::" in public.__doc__ and "Raises:" in public.__doc__
