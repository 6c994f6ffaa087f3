"""Target layers from the model's structure: token grids, SqueezeNet's head, `camx layers`."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import GradCAMRunner as GradCAM
from torch import nn
from torchvision.models import VisionTransformer

from cam_cli.cli import main
from cam_cli.errors import ModelError
from cam_cli.methods import TargetLayer
from cam_cli.methods.base import ActivationCapture
from cam_cli.models import Classifier, load_classifier
from cam_cli.probe import default_target, list_layers, resolve_target, run_probe

GRID = (4, 8)  # rows, columns of patches on a 32x32 input with 8x4 patches


class PatchTokens(nn.Module):
    """``(N, D, h, w)`` patches -> ``(N, 1 + h*w, D)`` tokens, a zero class token in front."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = patches.flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)


class TokenNet(nn.Module):
    """A ViT-shaped toy on a non-square grid whose class-0 score is the mean patch brightness.

    Channel 0 of the patch embedding sums a patch's pixels; the class token
    gathers the mean of the patch tokens; the head reads the class token.  So
    Grad-CAM for class 0 is the brightness of each patch: its peak is the
    bright patch, wherever it is put.  ``D = 4 = GRID[0]``, so the patch map
    ``(N, 4, 4, 8)`` also looks channels-last to a shape-only guess.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, kernel_size=(8, 4), stride=(8, 4), bias=False)
        self.tokens = PatchTokens()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[0] = 1.0
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(self.embed(x))
        return self.head(tokens[:, 0] + tokens[:, 1:].mean(dim=1))


def class0(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape[0], 1, dtype=torch.long)


@pytest.mark.parametrize("patch", [(0, 0), (1, 6), (3, 7), (2, 1)])
def test_token_maps_peak_at_the_bright_patch_on_a_non_square_grid(patch: tuple[int, int]) -> None:
    model = TokenNet().eval()
    classifier = Classifier(module=model, name="tokens", weights="set", input_size=32)
    target = default_target(run_probe(classifier))
    assert target == TargetLayer("tokens", "output", "tokens", GRID)
    x = torch.zeros(1, 3, 32, 32)
    row, col = patch
    x[:, :, 8 * row : 8 * row + 8, 4 * col : 4 * col + 4] = 1.0
    maps = GradCAM(model, model, target).explain(x, class0).maps[0, 0]
    assert maps.shape == GRID
    assert divmod(int(maps.argmax()), GRID[1]) == patch
    assert float(maps.max()) > 0 and int((maps > 0).sum()) == 1


def test_vit_tokens_are_read_on_the_patch_grid_without_the_class_token() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8, num_classes=3
    )
    vit.eval()
    assert not vit.heads.head.weight.any()  # torchvision zero-initialises the head: the probe must not care
    target = default_target(run_probe(Classifier(module=vit, name="vit", weights="random", input_size=32)))
    assert target == TargetLayer("encoder.layers.encoder_layer_0.ln_1", "output", "tokens", (4, 4))

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ActivationCapture(vit, target, requires_grad=False) as capture:
        vit(x)
        got = capture.feature_map()  # (N, D, 4, 4)
        patches = vit.conv_proj(x)  # (N, D, 4, 4): patch (i, j) is token 1 + 4 i + j
        pos = vit.encoder.pos_embedding[0]
        ln = vit.encoder.layers[0].ln_1
        for i in range(4):
            for j in range(4):
                expected = ln(patches[:, :, i, j] + pos[1 + 4 * i + j])
                torch.testing.assert_close(got[:, :, i, j], expected, rtol=1e-5, atol=1e-5)


def test_squeezenet_default_is_the_feature_block_not_the_class_score_maps() -> None:
    classifier = load_classifier("squeezenet1_1", "NONE", input_size=96)
    probe = run_probe(classifier)
    target = default_target(probe)
    assert target == TargetLayer("features", "output", "nchw")
    assert probe.find("features").shape == (1, 512, 5, 5)


class Twice(nn.Module):
    """A block run twice (a Siamese-style stem): its hooked activation would be ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(self.stem(x)) + self.stem(x.flip(-1))).flatten(1))


def test_a_layer_run_twice_is_never_the_target() -> None:
    probe = run_probe(Classifier(module=Twice().eval(), name="twice", weights="random", input_size=16))
    assert resolve_target(probe, None) == TargetLayer("pool", "input", "nchw")
    with pytest.raises(ModelError, match="'stem' runs 2 times in one forward pass"):
        resolve_target(probe, "stem")


def test_camx_layers_prints_shapes_and_marks_the_default() -> None:
    result = CliRunner().invoke(main, ["layers", "resnet18", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split() == ["layer", "type", "shape"]  # a header row names the columns
    rows = {line.split()[0]: line for line in lines}
    assert rows["layer4"].split()[1:] == ["Sequential", "512x2x2", "(default)"]
    assert rows["layer1"].split()[1:] == ["Sequential", "64x16x16"]
    assert rows["avgpool:input"].split()[1:3] == ["AdaptiveAvgPool2d", "512x2x2"]
    assert sum("(default)" in line for line in rows.values()) == 1


def test_every_layer_camx_layers_lists_is_accepted_by_layer() -> None:
    probe = run_probe(load_classifier("resnet18", "NONE", input_size=64))
    rows = list_layers(probe)
    labels = [row.label for row in rows]
    assert "layer4" in labels and "layer1.0.relu" not in labels  # a block's ReLU runs twice per forward
    for label in labels:
        resolve_target(probe, label)  # raises ModelError for a layer --layer would refuse


def test_camx_layers_on_a_vit_at_a_small_size() -> None:
    result = CliRunner().invoke(main, ["layers", "vit_b_32", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    default = [line for line in result.output.splitlines() if line.endswith("(default)")]
    assert [line.split()[0] for line in default] == ["encoder.layers.encoder_layer_11.ln_1"]
    assert "5x768" in default[0]  # one class token and a 2x2 grid of 32-pixel patches


def test_camx_layers_unknown_model_is_one_line_exit_1() -> None:
    result = CliRunner().invoke(main, ["layers", "resnet5"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("camx: error: unknown model 'resnet5' (did you mean resnet50")


def test_swin_default_is_named_after_the_layer_that_computed_it_and_layer_takes_it() -> None:
    probe = run_probe(load_classifier("swin_t", "NONE", input_size=64))
    target = default_target(probe)
    # not `permute` (torchvision's Permute module): the norm it permutes, read channels-last
    assert target == TargetLayer("norm", "output", "nhwc")
    assert resolve_target(probe, "norm") == target
    with ActivationCapture(probe.modules[""], target, requires_grad=False) as capture:
        probe.modules[""](probe.input)
        via_norm = capture.feature_map()
    with ActivationCapture(probe.modules[""], TargetLayer("permute"), requires_grad=False) as capture:
        probe.modules[""](probe.input)
        via_permute = capture.feature_map()
    torch.testing.assert_close(via_norm, via_permute)  # the same map


def test_a_global_pool_fed_a_1x1_map_is_refused_with_the_fix() -> None:
    probe = run_probe(load_classifier("resnet18", "NONE", input_size=32))
    with pytest.raises(ModelError, match=r"1x1, so there is nothing to localise; use a larger --input-size"):
        default_target(probe)


class WithSpare(nn.Module):
    """A model with a module its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.spare = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layer_fc_is_named_as_the_head_not_as_unused(tiny_model) -> None:
    probe = run_probe(Classifier(module=tiny_model, name="tiny", weights="seeded", input_size=32))
    with pytest.raises(ModelError) as head:
        resolve_target(probe, "fc")
    assert str(head.value) == (
        "layer 'fc' is the classifier head (its output is the logits, not a spatial map); "
        "pick a layer before it, see `camx layers MODEL`"
    )
    probe = run_probe(Classifier(module=WithSpare().eval(), name="spare", weights="seeded", input_size=32))
    with pytest.raises(ModelError, match=r"layer 'body' holds the classifier head body\.4 \(its output is the logits"):
        resolve_target(probe, "body")
    with pytest.raises(ModelError) as flat:
        resolve_target(probe, "body.3")  # used, but gives a vector per image
    assert "layer 'body.3' gives no spatial map" in str(flat.value) and "not used" not in str(flat.value)
    with pytest.raises(ModelError, match="layer 'spare' is not used by the forward pass"):
        resolve_target(probe, "spare")
