"""Every torchvision classifier, random weights, through the library: the default
layer gives a sane Grad-CAM map, CAM where the head is GAP + linear, a refusal
naming the head elsewhere.

The models over 150M parameters are marked slow (5 to 25 s each on 2 cores)
and run only with ``-m slow`` or ``CAMX_SLOW=1``.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torchvision
from click.testing import CliRunner
from helpers import CAMRunner as CAM
from helpers import GradCAMRunner as GradCAM

from cam_cli.cli import main
from cam_cli.errors import ModelError
from cam_cli.methods.base import to_feature_map
from cam_cli.models import load_classifier, supported_models
from cam_cli.models.detection import detection_models
from cam_cli.probe import cam_head, resolve_target, run_probe
from cam_cli.probe.catalog import describe_model, read_table

# Smallest convenient input per model: 64 px gives a 2x2 map at stride 32.
SIZES = {"maxvit_t": 224, "inception_v3": 128, "vit_h_14": 56}
MODELS = sorted(torchvision.models.list_models(module=torchvision.models))
PARAMS = {name: torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] for name in MODELS}
SLOW = {name for name in MODELS if PARAMS[name] > 150e6}
# Families whose head is global average pooling then one linear layer (dropout allowed).
CAM_FAMILIES = (
    "densenet", "efficientnet", "googlenet", "inception", "mnasnet", "mobilenet_v2", "regnet",
    "resnet", "resnext", "wide_resnet", "shufflenet", "swin",
)  # fmt: skip
TOP = 3


def _params(names: list[str]) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow, id=n) if n in SLOW else pytest.param(n, id=n) for n in names]


def minmax(m: torch.Tensor) -> torch.Tensor:
    low, high = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    return (m - low) / (high - low).clamp_min(torch.finfo(m.dtype).tiny)


def top(logits: torch.Tensor) -> torch.Tensor:
    return logits.topk(TOP, dim=1).indices


@pytest.mark.parametrize("name", _params(MODELS))
def test_default_layer_gives_gradcam_and_cam_or_a_refusal(name: str, request: pytest.FixtureRequest) -> None:
    if name in SLOW and not (os.environ.get("CAMX_SLOW") or "slow" in request.config.getoption("-m")):
        pytest.skip(f"{name} is slow ({PARAMS[name] / 1e6:.0f}M parameters): run with -m slow or CAMX_SLOW=1")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = load_classifier(name, "NONE", input_size=SIZES.get(name, 64))
    for module in classifier.module.modules():  # ViT's head is zero at init: no gradient at all
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    probe = run_probe(classifier)
    target = resolve_target(probe, None)
    record = probe.find(target.label)
    assert record is not None
    h, w = to_feature_map(record.tensor, target).shape[-2:]
    assert h * w > 1, f"{target.label} is not a spatial map: {record.shape}"
    x = torch.randn(2, 3, classifier.input_size, classifier.input_size, generator=torch.Generator().manual_seed(1))

    grad = GradCAM(classifier.logits, classifier.module, target).explain(x, top)
    assert grad.maps.shape == (2, TOP, h, w)
    assert torch.isfinite(grad.maps).all() and (grad.maps >= 0).all()
    assert (grad.maps.flatten(1) > 0).any(dim=1).all(), "every image needs a non-zero map among its top classes"
    if target.layout == "tokens":
        assert (h, w) == (classifier.input_size // classifier.module.patch_size,) * 2

    if not name.startswith(CAM_FAMILIES):
        with pytest.raises(ModelError, match=r"but this model's head is .+ -> .+; use --method gradcam"):
            cam_head(probe, target)
        return
    head = cam_head(probe, target)
    cam = CAM(classifier.logits, classifier.module, target, head.weight, head.pre_activation).explain(x, top)
    assert cam.maps.shape == (2, TOP, h, w) and torch.isfinite(cam.maps).all()
    assert torch.equal(cam.classes, grad.classes)
    # Logit = mean of the CAM map + bias: CAM reproduces the model's own scores.
    bias = probe.head.bias if probe.head is not None and probe.head.bias is not None else 0
    scores = cam.maps.mean(dim=(2, 3)) + torch.as_tensor(bias).float()[cam.classes]
    torch.testing.assert_close(
        scores, cam.logits.gather(1, cam.classes), rtol=1e-3, atol=1e-4 * float(scores.abs().max())
    )
    if head.pre_activation is None:  # DESIGN: normalised Grad-CAM == normalised ReLU(CAM) at the pooling input
        torch.testing.assert_close(minmax(grad.maps), minmax(torch.relu(cam.maps)), rtol=0, atol=1e-4)


# -------------------------------------------------------------- `camx models`

SMALL = ["resnet18", "squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5"]


def test_the_shipped_table_covers_exactly_the_installed_models() -> None:
    table = read_table()
    assert sorted(table) == supported_models()
    for row in table.values():
        keys = {"model", "cam", "layer", "input_size", "reason"}  # a model of another task names it
        assert row.keys() == (keys if "task" not in row else keys | {"task"})
        assert row.get("task", "classification") in ("classification", "segmentation")
        assert row["cam"] == row["model"].startswith((*CAM_FAMILIES, "efficientnet_lite"))
        assert (row["reason"] is None) == row["cam"]


@pytest.mark.parametrize("name", SMALL)
def test_the_shipped_table_agrees_with_live_probing(name: str) -> None:
    assert describe_model(name) == read_table()[name]


def test_camx_models_lists_every_model_with_methods_size_and_layer() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == ["model", "methods", "size", "default", "layer"]  # a header row names the columns
    lines = {line.split()[0]: line.split(maxsplit=4)[1:] for line in rows}
    detectors = {name for name, line in lines.items() if line[0] == "detection"}  # listed after the others
    assert sorted(detectors) == detection_models() and len(detectors) == 12
    assert sorted(set(lines) - detectors) == supported_models()
    assert lines["resnet50"] == ["cam+gradcam", "224", "layer4"]
    assert lines["inception_v3"] == ["cam+gradcam", "299", "Mixed_7c"]
    assert lines["vit_b_16"][:3] == ["gradcam", "224", "encoder.layers.encoder_layer_11.ln_1"]
    assert lines["mobilenet_v3_large"][3].startswith("(no CAM: head: AdaptiveAvgPool2d -> Linear -> Hardswish")
    assert lines["swin_t"] == ["cam+gradcam", "224", "norm"]  # not `permute`: the layer `--layer` takes

    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {row["model"]: row for row in rows if row.get("task") != "detection"} == read_table()


def test_camx_models_takes_a_pattern() -> None:
    result = CliRunner().invoke(main, ["models", "resnet1*"])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()[1:]] == ["resnet101", "resnet152", "resnet18"]


def test_weights_none_is_the_same_model_for_the_same_seed_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = load_classifier("resnet18", "NONE").module.state_dict()
    again = load_classifier("resnet18", "NONE", seed=0).module.state_dict()
    other = load_classifier("resnet18", "NONE", seed=1).module.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_a_misspelt_model_gets_three_suggestions_and_a_pointer_not_every_name() -> None:
    result = CliRunner().invoke(main, ["layers", "resnet5O"])
    assert result.exit_code == 1
    assert result.output == (
        "camx: error: unknown model 'resnet5O' (did you mean resnet50, resnet152, resnet34?); "
        "`camx models` lists the models\n"
    )


def test_models_probe_builds_only_the_models_the_pattern_matches(monkeypatch) -> None:
    from cam_cli.probe import catalog

    built: list[str] = []
    real = catalog.describe_model

    def counted(name: str) -> dict:
        built.append(name)
        assert name == "resnet18", f"built {name}, which the pattern does not match"
        return real(name)

    monkeypatch.setattr(catalog, "describe_model", counted)
    result = CliRunner().invoke(main, ["models", "--probe", "resnet18"])
    assert result.exit_code == 0, result.output
    assert built == ["resnet18"]
    header, row = result.output.splitlines()
    assert row.split() == ["resnet18", "cam+gradcam", "224", "layer4"]


def test_models_probe_rows_come_one_at_a_time(monkeypatch) -> None:
    """Each model is built when its row is asked for, so that `camx models --probe` prints
    every row as soon as it is ready."""
    from cam_cli.probe import catalog

    built: list[str] = []
    monkeypatch.setattr(catalog, "describe_model", lambda name: built.append(name) or {"model": name})
    rows = catalog.describe_models(live=True, pattern="resnet1*")
    assert built == []
    assert next(rows) == {"model": "resnet101"} and built == ["resnet101"]
    assert [row["model"] for row in rows] == ["resnet152", "resnet18"]
