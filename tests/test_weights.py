"""The real weight loader: torchvision's weights API and its cache, offline."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from click.testing import CliRunner

from cam_cli.cli import main
from cam_cli.errors import WeightsError
from cam_cli.models import checkpoint_dir, load_classifier


@pytest.fixture
def cached_resnet18(torch_home):
    """A resnet18 checkpoint placed where torchvision's cache looks, under torchvision's file name."""
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    target = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    return reference, target


def test_checkpoint_dir_follows_torch_home(torch_home):
    assert checkpoint_dir() == torch_home / "hub" / "checkpoints"


def test_default_weights_come_from_the_cache_with_their_metadata(cached_resnet18):
    reference, _ = cached_resnet18
    classifier = load_classifier("resnet18", "DEFAULT")
    assert torch.equal(classifier.module.fc.weight, reference.fc.weight)
    assert classifier.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert classifier.categories is not None and classifier.categories[281] == "tabby"
    assert classifier.input_size == 224
    assert classifier.mean == pytest.approx((0.485, 0.456, 0.406))
    assert not any(p.requires_grad for p in classifier.module.parameters())


def test_enum_name_selects_the_same_weights(cached_resnet18):
    classifier = load_classifier("resnet18", "IMAGENET1K_V1")
    assert classifier.weights == "ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(WeightsError, match="expected one of DEFAULT, NONE, IMAGENET1K_V1"):
        load_classifier("resnet18", "IMAGENET1K_V9")


def test_cli_uses_the_cached_weights_and_class_names(cached_resnet18, image_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(image_dir),
            "-o",
            str(out),
            "--model",
            "resnet18",
            "--device",
            "cpu",
            "-q",
            "--input-size",
            "64",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    reference, _ = cached_resnet18
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    for record in records:
        assert record["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
        assert record["class_name"] == categories[record["class_index"]]


def test_a_cached_pickle_that_would_run_code_is_refused(torch_home, tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    target = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save({"fc.weight": Exploit()}, target)
    with pytest.raises(WeightsError, match="refusing to load .*could run code"):
        load_classifier("resnet18", "DEFAULT")
    assert not (tmp_path / "pwned").exists()


def test_state_dict_path_with_another_number_of_classes_is_inferred(tmp_path):
    torch.manual_seed(0)
    tuned = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "tuned.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tuned.state_dict().items()}}, path)
    classifier = load_classifier("resnet18", str(path))
    assert classifier.module.fc.out_features == 7
    assert torch.equal(classifier.module.fc.bias, tuned.fc.bias)
    assert classifier.categories is None


@pytest.mark.slow
def test_a_pretrained_vit_refuses_another_input_size_in_one_line(torch_home, image_dir, tmp_path):
    weights = torchvision.models.ViT_B_32_Weights.IMAGENET1K_V1
    target = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    torch.save(torchvision.models.vit_b_32(weights=None).state_dict(), target)
    args = ["explain", str(image_dir), "-o", str(tmp_path / "out"), "--model", "vit_b_32", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--input-size", "256"])
    assert result.exit_code == 1
    assert result.output == (
        "camx: error: vit_b_32 with pretrained weights takes 224x224 inputs only (its position embeddings "
        "are learnt for that size): drop --input-size 256, or use --weights NONE\n"
    )
    assert not (tmp_path / "out").exists()
