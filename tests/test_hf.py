"""Hugging Face transformers models (``--model hf:PATH`` / ``hf:ORG/NAME``), offline: tiny
random ViT, ConvNeXt and Swin folders saved here, with their own preprocessing and
id2label names; a folder asking for remote code is refused before anything in it runs."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cam_cli.cli import main
from cam_cli.errors import ModelError, WeightsError
from cam_cli.images import discover
from cam_cli.jobs.data import ImageDataset
from cam_cli.models import load_classifier
from cam_cli.probe import default_target, run_probe

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

RUN = ["--device", "cpu", "--workers", "0", "-q"]
NAMES = {0: "heron", 1: "otter", 2: "lynx"}


def explain(inputs: Path, out: Path, *args: object) -> object:
    return CliRunner().invoke(main, ["explain", str(inputs), "-o", str(out), *RUN, *(str(a) for a in args)])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _save(folder: Path, config: object, model_class: object, processor: object) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(config).eval()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def vit_folder(root: Path) -> Path:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
        intermediate_size=32, id2label=NAMES, label2id={v: k for k, v in NAMES.items()},
    )  # fmt: skip
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    )
    return _save(root / "vit", config, transformers.ViTForImageClassification, processor)


def convnext_folder(root: Path) -> Path:
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=48, id2label=NAMES,
        label2id={v: k for k, v in NAMES.items()},
    )  # fmt: skip
    processor = transformers.ConvNextImageProcessor(
        size={"shortest_edge": 48}, image_mean=[0.3, 0.3, 0.3], image_std=[0.2, 0.2, 0.2], resample=3
    )
    return _save(root / "convnext", config, transformers.ConvNextForImageClassification, processor)


def swin_folder(root: Path) -> Path:
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2,
        id2label=NAMES, label2id={v: k for k, v in NAMES.items()},
    )  # fmt: skip
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.25, 0.25]
    )
    return _save(root / "swin", config, transformers.SwinForImageClassification, processor)


FOLDERS = {"vit": vit_folder, "convnext": convnext_folder, "swin": swin_folder}
# transformers 5 names ViT's blocks vit.layers.N, 4.x vit.encoder.layer.N
VIT_LAST = "vit.layers.1" if transformers.__version__ >= "5" else "vit.encoder.layer.1"
DEFAULT_LAYERS = {
    "vit": (f"{VIT_LAST}.layernorm_before", "tokens"),
    "convnext": ("convnext.encoder.stages.1", "nchw"),
    "swin": ("swin.layernorm", "tokens"),
}
PREPROCESSING = {
    "vit": (32, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]),
    "convnext": (48, [0.3, 0.3, 0.3], [0.2, 0.2, 0.2]),
    "swin": (32, [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]),
}


@pytest.mark.parametrize("kind", sorted(FOLDERS))
def test_a_saved_folder_gives_its_id2label_names_and_its_own_preprocessing(kind, image_dir, tmp_path):
    folder = FOLDERS[kind](tmp_path)
    out = tmp_path / "out"
    result = explain(image_dir, out, "--model", f"hf:{folder}")
    assert result.exit_code == 0, result.output
    size, mean, std = PREPROCESSING[kind]
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    images = discover([image_dir], [], exclude=None)
    dataset = ImageDataset(images, size, 10**8)
    keys = {image.key: i for i, image in enumerate(images)}
    lines = records(out)
    assert len(lines) == 6
    for line in lines:
        assert line["model"] == f"hf:{folder}" and line["weights"] == "DEFAULT"
        assert (line["input_size"], line["mean"], line["std"]) == (size, mean, std)
        assert (line["layer"], line["status"]) == (DEFAULT_LAYERS[kind][0], "ok")
        x = dataset[keys[line["key"]]].image.float().unsqueeze(0) / 255
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            probs = model(pixel_values=x).logits.softmax(1)[0]
        assert line["class_index"] == int(probs.argmax())
        assert line["class_name"] == NAMES[int(probs.argmax())]
        assert line["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    again = explain(image_dir, out, "--model", f"hf:{folder}", "--json")  # the recorded hf:PATH resumes
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["skipped"] == 6


@pytest.mark.parametrize("kind", sorted(FOLDERS))
def test_default_layers_per_family(kind, tmp_path):
    classifier = load_classifier(f"hf:{FOLDERS[kind](tmp_path)}", "DEFAULT")
    target = default_target(run_probe(classifier))
    assert (target.label, target.layout) == DEFAULT_LAYERS[kind]


def test_remote_code_is_refused_before_the_folder_s_module_is_imported(image_dir, tmp_path, monkeypatch):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "IMPORTED"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(9)\n")
    (folder / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoModelForImageClassification": "modeling_evil.Evil"}})
    )
    monkeypatch.syspath_prepend(str(folder))  # even where Python could find it, it is never imported
    result = explain(image_dir, tmp_path / "out", "--model", f"hf:{folder}")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "refusing" in result.output and "remote code (auto_map)" in result.output
    assert not marker.exists() and "modeling_evil" not in sys.modules
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_org_name_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as missing:
        load_classifier("hf:someone/tiny-vit", "DEFAULT")
    assert "\n" not in str(missing.value) and str(cache) in str(missing.value)

    folder = vit_folder(tmp_path)
    snapshot = cache / "models--someone--tiny-vit" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (cache / "models--someone--tiny-vit" / "refs").mkdir()
    (cache / "models--someone--tiny-vit" / "refs" / "main").write_text("abc123")
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    classifier = load_classifier("hf:someone/tiny-vit", "DEFAULT")
    assert classifier.categories == ["heron", "otter", "lynx"]
    assert classifier.name == "hf:someone/tiny-vit" and classifier.input_size == 32


def test_weights_none_path_and_num_classes(tmp_path):
    folder = vit_folder(tmp_path)
    state = torch.get_rng_state()
    a = load_classifier(f"hf:{folder}", "NONE").module.state_dict()
    b = load_classifier(f"hf:{folder}", "NONE").module.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)

    trained = transformers.AutoModelForImageClassification.from_pretrained(folder)
    ckpt = tmp_path / "ft.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(ckpt))
    loaded = load_classifier(f"hf:{folder}", str(ckpt))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.logits(x), trained(pixel_values=x).logits)
    with pytest.raises(WeightsError, match="do not fit the model"):
        load_classifier(f"hf:{folder}", str(ckpt), num_classes=5)
    with pytest.raises(WeightsError, match="--num-classes 5 does not match"):
        load_classifier(f"hf:{folder}", "DEFAULT", num_classes=5)
    assert load_classifier(f"hf:{folder}", "NONE", num_classes=5).module.config.num_labels == 5


def test_without_transformers_the_error_names_the_extra(monkeypatch, tmp_path):
    folder = vit_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"pip install 'camx\[hf\]'"):
        load_classifier(f"hf:{folder}", "DEFAULT")


def test_camx_layers_takes_an_hf_folder(tmp_path):
    result = CliRunner().invoke(main, ["layers", f"hf:{vit_folder(tmp_path)}"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    assert rows[f"{VIT_LAST}.layernorm_before"] == ["LayerNorm", "17x16", "(default)"]
    assert not any(".attention." in name and rows[name][-1] == "(default)" for name in rows)


def _tiny(kind: str) -> tuple[object, object, int]:
    t = transformers
    vit = {"image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2}
    return {
        "deit": (t.DeiTConfig(**vit, intermediate_size=32), t.DeiTForImageClassificationWithTeacher, 32),
        "beit": (t.BeitConfig(**vit, intermediate_size=32, use_mean_pooling=True), t.BeitForImageClassification, 32),
        "resnet": (
            t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
            t.ResNetForImageClassification,
            64,
        ),
        "regnet": (
            t.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
            t.RegNetForImageClassification,
            64,
        ),
        "efficientnet": (t.EfficientNetConfig(image_size=64), t.EfficientNetForImageClassification, 64),
        "mobilevit": (
            t.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32]),
            t.MobileViTForImageClassification,
            64,
        ),
    }[kind]


MORE_LAYERS = {
    "deit": ("deit.layers.1.layernorm_before", "tokens", (4, 4)),  # class and distillation tokens dropped
    "beit": ("beit.layernorm", "tokens", (4, 4)),
    "resnet": ("resnet.encoder.stages.1", "nchw", None),
    "regnet": ("regnet.encoder.stages.1", "nchw", None),
    "efficientnet": ("efficientnet.encoder.top_activation", "nchw", None),
    "mobilevit": ("mobilevit.conv_1x1_exp", "nchw", None),
}


@pytest.mark.parametrize("kind", sorted(MORE_LAYERS))
def test_default_layers_of_more_families(kind, tmp_path):
    config, model_class, size = _tiny(kind)
    folder = tmp_path / kind
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_class(config).save_pretrained(folder)
    target = default_target(run_probe(load_classifier(f"hf:{folder}", "DEFAULT", input_size=size)))
    name, layout, grid = MORE_LAYERS[kind]
    if transformers.__version__ < "5":
        name = name.replace(".layers.", ".encoder.layer.")
    assert (target.label, target.layout, target.grid) == (name, layout, grid)
