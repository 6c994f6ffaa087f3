"""The public Python face: ``cam_cli.explain`` and ``cam_cli.load_model``, against
pytorch-grad-cam and against the CLI's own path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_method_parity import MODELS, SIZE, batch, minmax, reference
from torch import nn

import cam_cli
from cam_cli.errors import InputError, ModelError
from cam_cli.models import load_classifier


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "layercam", "xgradcam", "eigencam", "scorecam"])
@pytest.mark.parametrize("model_key", ["tiny", "bnnet"])
def test_each_method_equals_pytorch_grad_cam(name: str, model_key: str) -> None:
    x = batch(3)
    result = cam_cli.explain(MODELS[model_key](), x, methods=name)[name]
    assert result.maps.shape == (3, SIZE, SIZE)
    theirs = reference(name, model_key, x, result.classes)
    for i in range(3):
        np.testing.assert_allclose(result.maps[i].numpy(), minmax(theirs[i]), atol=1e-4, err_msg=f"image {i}")


def test_several_methods_from_one_call_equal_one_call_each() -> None:
    x = batch(4, seed=3)
    together = cam_cli.explain(MODELS["bnnet"](), x, methods="gradcam,eigencam,layercam")
    for name, maps in together.items():
        alone = cam_cli.explain(MODELS["bnnet"](), x, methods=[name])[name]
        torch.testing.assert_close(maps.maps, alone.maps, atol=1e-5, rtol=0)
        assert torch.equal(maps.classes, alone.classes)


def test_maps_classes_and_scores_are_what_the_cli_records() -> None:
    model = MODELS["tiny"]()
    x = batch(2)
    result = cam_cli.explain(model, x)["gradcam"]
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(result.classes, logits.argmax(1))
    torch.testing.assert_close(result.scores, logits.softmax(1).gather(1, result.classes[:, None])[:, 0])
    for m in result.maps:
        assert float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0, abs=0)


def test_a_fixed_class_and_top_k() -> None:
    x = batch(2)
    fixed = cam_cli.explain(MODELS["tiny"](), x, target=3)["gradcam"]
    assert fixed.classes.tolist() == [3, 3]
    top = cam_cli.explain(MODELS["tiny"](), x, target="top2")["gradcam"]
    assert top.maps.shape == (2, 2, SIZE, SIZE) and top.classes.shape == (2, 2)
    torch.testing.assert_close(top.maps[:, 0], cam_cli.explain(MODELS["tiny"](), x)["gradcam"].maps)


def test_a_named_layer_is_used_and_an_unknown_one_refused() -> None:
    model = MODELS["bnnet"]()
    default = cam_cli.explain(model, batch(1))["gradcam"].maps
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    earlier = cam_cli.explain(model, batch(1), layer=names[0])["gradcam"].maps
    assert not torch.allclose(default, earlier)
    with pytest.raises(ModelError, match="unknown layer"):
        cam_cli.explain(model, batch(1), layer="no_such_layer")


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MODELS["tiny"]()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x), "other": x.mean()}


def test_a_model_returning_a_dict_with_output_key() -> None:
    wrapped = DictOutput()
    x = batch(2)
    mine = cam_cli.explain(wrapped, x, output_key="logits")["gradcam"]
    plain = cam_cli.explain(wrapped.inner, x)["gradcam"]
    torch.testing.assert_close(mine.maps, plain.maps)


def test_the_model_is_left_as_it_was() -> None:
    model = MODELS["bnnet"]().train()
    requires = [p.requires_grad for p in model.parameters()]
    cam_cli.explain(model, batch(2), methods="gradcam,scorecam")
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == requires
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]
)
def test_inputs_of_the_wrong_shape_or_type_get_one_clear_error(bad: torch.Tensor) -> None:
    with pytest.raises(InputError, match="inputs must be"):
        cam_cli.explain(MODELS["tiny"](), bad)


def test_cam_on_a_head_it_cannot_use_names_the_reason() -> None:
    with pytest.raises(ModelError):
        cam_cli.explain(MODELS["vit"](), batch(1), methods="cam")


def test_load_model_gives_what_the_cli_loads() -> None:
    mine = cam_cli.load_model("resnet18", weights="NONE", input_size=64)
    cli = load_classifier("resnet18", "NONE", input_size=64)
    assert (mine.input_size, mine.mean, mine.std, mine.categories) == (
        cli.input_size,
        cli.mean,
        cli.std,
        cli.categories,
    )
    for a, b in zip(mine.module.state_dict().values(), cli.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = cam_cli.explain(mine, x, methods="cam,gradcam")
    assert result["cam"].maps.shape == (1, 64, 64)


def test_import_cam_cli_does_not_import_torch() -> None:
    code = "import sys, cam_cli; cam_cli.__version__; assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
