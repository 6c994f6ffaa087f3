"""timm models by name (``--model timm:NAME``), offline: random, local checkpoints and
the Hugging Face cache; their own preprocessing and labels; default layers for every
family (the sweep, marked slow, builds one architecture per timm model module)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cam_cli.cli import main
from cam_cli.errors import ModelError, WeightsError
from cam_cli.images import discover
from cam_cli.jobs.data import ImageDataset
from cam_cli.methods.base import ActivationCapture, TargetLayer
from cam_cli.models import Classifier, imagenet_categories, load_classifier
from cam_cli.probe import default_target, resolve_target, run_probe

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

RUN = ["--device", "cpu", "--workers", "0", "-q"]


def explain(inputs: Path, out: Path, *args: object) -> object:
    return CliRunner().invoke(main, ["explain", str(inputs), "-o", str(out), *RUN, *(str(a) for a in args)])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def build(name: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, **kwargs).eval()


def save(module: torch.nn.Module, path: Path) -> Path:
    safetensors_torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def own_prediction(module: torch.nn.Module, image_dir: Path, size: int, mean, std) -> dict[str, tuple[int, float]]:
    """What the model itself says for each image, fed the way camx feeds it (whole image, no crop)."""
    images = discover([image_dir], [], exclude=None)
    dataset = ImageDataset(images, size, 10**8)
    out = {}
    for i, image in enumerate(images):
        x = dataset[i].image.float().unsqueeze(0) / 255
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            probs = module(x).softmax(1)[0]
        out[image.key] = (int(probs.argmax()), float(probs.max()))
    return out


def hub_cache(root: Path, repo: str, files: dict[str, Path | str]) -> Path:
    """A Hugging Face cache holding ``files`` of ``repo`` (the layout huggingface_hub reads)."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0123456789abcdef")
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, Path):
            target.write_bytes(content.read_bytes())
        else:
            target.write_text(content)
    return root


# ---------------------------------------------------------------- loading and preprocessing


def test_a_safetensors_checkpoint_gives_the_class_label_and_score_the_model_gives(image_dir, tmp_path):
    model = build("test_resnet", num_classes=4)
    ckpt = save(model, tmp_path / "finetuned.safetensors")
    labels = tmp_path / "labels.txt"
    labels.write_text("ant\nbee\ncat\ndog\n")
    out = tmp_path / "out"
    result = explain(image_dir, out, "--model", "timm:test_resnet", "--weights", ckpt, "--labels", labels)
    assert result.exit_code == 0, result.output
    cfg = timm.data.resolve_data_config({}, model=model)
    expected = own_prediction(model, image_dir, cfg["input_size"][-1], cfg["mean"], cfg["std"])
    lines = records(out)
    assert len(lines) == 6
    for line in lines:
        assert line["model"] == "timm:test_resnet" and line["weights"] == str(ckpt)
        assert line["input_size"] == 160 and line["mean"] == [0.5, 0.5, 0.5] and line["std"] == [0.5, 0.5, 0.5]
        index, score = expected[line["key"]]
        assert line["class_index"] == index
        assert line["class_name"] == ["ant", "bee", "cat", "dog"][index]
        assert line["score"] == pytest.approx(score, abs=1e-4)
    # the same command again resumes: nothing to redo, and the recorded model rebuilds as it was
    again = explain(image_dir, out, "--model", "timm:test_resnet", "--weights", ckpt, "--labels", labels, "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output.strip().splitlines()[-1])
    assert summary["done"] == 0 and summary["skipped"] == 6
    rebuilt = load_classifier(lines[0]["model"], lines[0]["weights"])
    rebuilt_state, own_state = rebuilt.module.state_dict(), model.state_dict()
    assert rebuilt_state.keys() == own_state.keys()
    assert all(torch.equal(rebuilt_state[k], own_state[k]) for k in own_state)


def test_a_1000_class_checkpoint_gets_imagenet_names_and_timm_preprocessing(tmp_path):
    model = build("test_vit")
    classifier = load_classifier("timm:test_vit", str(save(model, tmp_path / "vit.safetensors")))
    assert classifier.categories == imagenet_categories()
    assert (classifier.input_size, classifier.mean, classifier.std) == (160, (0.5,) * 3, (0.5,) * 3)
    assert classifier.interpolation == "bicubic"
    x = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(classifier.logits(x), model(x))


def test_num_classes_is_loaded_strictly_where_timm_would_drop_the_head(tmp_path):
    ckpt = save(build("test_resnet", num_classes=4), tmp_path / "four.safetensors")
    assert load_classifier("timm:test_resnet", str(ckpt)).module.num_classes == 4  # read from the checkpoint
    with pytest.raises(WeightsError, match=r"do not fit the model: .*fc\.weight"):
        load_classifier("timm:test_resnet", str(ckpt), num_classes=7)
    pth = tmp_path / "four.pth"
    torch.save(build("test_resnet", num_classes=4).state_dict(), pth)
    assert load_classifier("timm:test_resnet", str(pth), num_classes=4).module.num_classes == 4


def test_default_weights_come_from_the_local_hugging_face_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as missing:
        load_classifier("timm:test_resnet", "DEFAULT")
    message = str(missing.value)
    assert "\n" not in message
    assert "model.safetensors" in message and "timm/test_resnet.r160_in1k" in message and str(tmp_path) in message

    trained = build("test_resnet", seed=3)
    hub_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", {"model.safetensors": save(trained, tmp_path / "w")})
    classifier = load_classifier("timm:test_resnet", "DEFAULT")
    assert classifier.weights == "DEFAULT" and classifier.categories == imagenet_categories()
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(classifier.logits(x), trained(x))
    with pytest.raises(WeightsError, match="--num-classes 5 does not match"):
        load_classifier("timm:test_resnet", "DEFAULT", num_classes=5)


def test_none_is_reproducible_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = load_classifier("timm:test_vit", "NONE").module.state_dict()
    b = load_classifier("timm:test_vit", "NONE").module.state_dict()
    c = load_classifier("timm:test_vit", "NONE", seed=1).module.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_names_and_tags_are_one_line_with_suggestions():
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet1B' \(did you mean resnet18") as error:
        load_classifier("timm:resnet1B", "NONE")
    assert "camx models --source timm" in str(error.value)
    with pytest.raises(WeightsError, match="no pretrained tag 'nope' for resnet18; its tags: .*resnet18.a1_in1k"):
        load_classifier("timm:resnet18.nope", "DEFAULT")
    with pytest.raises(ModelError, match="is a timm model: use --model timm:convnext_atto"):
        load_classifier("convnext_atto", "NONE")


def test_without_timm_installed_the_error_names_the_extra(monkeypatch, image_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    result = explain(image_dir, tmp_path / "out", "--model", "timm:resnet18", "--weights", "NONE")
    assert result.exit_code == 1
    assert result.output == "camx: error: timm models need timm: pip install 'camx[timm]'\n"


def test_camx_help_imports_neither_timm_nor_transformers():
    code = (
        "import sys\nfrom cam_cli.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('timm', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- layers


def test_vit_default_is_the_last_norm1_and_per_head_tensors_are_refused():
    classifier = load_classifier("timm:test_vit", "NONE", input_size=64)
    probe = run_probe(classifier)
    assert default_target(probe) == TargetLayer("blocks.5.norm1", "output", "tokens", (4, 4))
    assert resolve_target(probe, "blocks.2.norm1") == TargetLayer("blocks.2.norm1", "output", "tokens", (4, 4))
    for internal in ("blocks.5.attn.k_norm", "blocks.5.attn.q_norm"):
        with pytest.raises(ModelError, match="not one image's feature map"):
            resolve_target(probe, internal)


def test_layer_norm1_on_a_timm_vit_runs_through_explain(image_dir, tmp_path):
    out = tmp_path / "out"
    result = explain(image_dir, out, "--model", "timm:test_vit", "--weights", "NONE", "--input-size", 64,
                     "--layer", "blocks.4.norm1")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = records(out)
    assert {(line["status"], line["layer"]) for line in lines} == {("ok", "blocks.4.norm1")}
    assert all(np.load(out / line["map"]).shape == (line["height"], line["width"]) for line in lines)
    refused = explain(image_dir, tmp_path / "k", "--model", "timm:test_vit", "--weights", "NONE",
                      "--input-size", 64, "--layer", "blocks.4.attn.k_norm")  # fmt: skip
    assert refused.exit_code == 1
    assert "not one image's feature map" in refused.output and refused.output.count("\n") == 1


def test_the_issue_s_factory_vit_gets_norm1_and_its_own_normalisation():
    classifier = load_classifier("timm.models.vision_transformer:test_vit", "NONE")
    assert classifier.mean == (0.5, 0.5, 0.5) and classifier.input_size == 160
    assert default_target(run_probe(classifier)).name == "blocks.5.norm1"


@pytest.mark.parametrize(("distilled", "registers"), [(False, 0), (False, 4), (False, 12), (True, 0)])
def test_prefix_tokens_counted_from_the_model_are_dropped(registers: int, distilled: bool):
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    model = build(name, img_size=32, depth=2, embed_dim=16, num_heads=2, reg_tokens=registers, num_classes=3)
    assert model.num_prefix_tokens == 1 + int(distilled) + registers
    probe = run_probe(Classifier(model, "vit", "NONE", 32))
    target = default_target(probe)
    assert target == TargetLayer("blocks.1.norm1", "output", "tokens", (2, 2))
    assert probe.prefix_tokens == model.num_prefix_tokens
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ActivationCapture(model, target, requires_grad=False) as capture:
        model(x)
        tokens = capture.activation  # (N, prefix + 4, D)
        got = capture.feature_map()
    patches = tokens[:, model.num_prefix_tokens :].reshape(2, 2, 2, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, patches)


def test_swin_is_read_channels_last_at_its_final_norm():
    model = build(
        "swin_tiny_patch4_window7_224", img_size=32, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2
    )
    probe = run_probe(Classifier(model, "swin", "NONE", 32))
    target = default_target(probe)
    assert target == TargetLayer("norm", "output", "nhwc")
    assert probe.find("norm").shape == (1, 4, 4, 16)


def test_camx_layers_and_models_for_timm_have_headers():
    result = CliRunner().invoke(main, ["layers", "timm:test_vit", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["layer", "type", "shape"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["blocks.5.norm1"] == ["LayerNorm", "17x64", "(default)"]
    assert "blocks.5.attn.k_norm" not in rows  # per-head (N, heads, T, d): never offered

    result = CliRunner().invoke(main, ["models", "--source", "timm", "convnext_at*"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["model", "methods", "size", "default", "layer"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["timm:convnext_atto", "timm:convnext_atto_ols", "timm:convnext_atto_rms"]
    result = CliRunner().invoke(main, ["models", "--source", "timm", "--probe", "test_resnet"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split() == ["timm:test_resnet", "cam+gradcam", "160", "layer4"]


# ---------------------------------------------------------------- the sweep: one architecture per timm module

# Smallest architecture of each timm model module (by parameters) and the input size it runs at:
# 64 where nothing forbids it; larger where the last map would be 1x1 (stride 64) or the model
# takes only its own size.
SWEEP_SIZES = {
    "halonet_h1": 256, "crossvit_tiny_240": 240, "csatv2": 128, "efficientformer_l1": 224, "efficientvit_m0": 96,
    "inception_resnet_v2": 128, "inception_v3": 128, "inception_v4": 128, "selecsls42": 96, "shvit_s1": 96,
    "vgg11": 256,
}  # fmt: skip


def _sweep_models() -> list[tuple[str, str]]:
    from timm.models import _registry

    best: dict[str, tuple[float, str]] = {}
    for name in timm.list_models():
        module = _registry._model_to_module[name]
        score = float(len(name)) if name.startswith("test_") else 1e9  # timm's own test models first
        best.setdefault(module, (score, name))
        if score < best[module][0]:
            best[module] = (score, name)
    return sorted((module, SWEEP_CHOICES.get(module, name)) for module, (_, name) in best.items())


# The smallest architecture of modules without a test_ model (parameters counted on the meta device).
SWEEP_CHOICES = {
    "beit": "beit_base_patch16_224", "byoanet": "halonet_h1", "cait": "cait_xxs24_224", "coat": "coat_tiny",
    "convit": "convit_tiny", "convmixer": "convmixer_768_32", "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240", "csatv2": "csatv2", "cspnet": "cs3darknet_focus_s", "cspnext": "cspnext_tiny",
    "davit": "davit_tiny", "deepseek_vit": "deepseek_vit_412m", "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121", "dla": "dla46x_c", "dpn": "dpn48b", "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1", "efficientformer_v2": "efficientformerv2_s0",
    "efficientvim": "efficientvim_m1", "efficientvit_mit": "efficientvit_b0", "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb", "fasternet": "fasternet_t0", "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf", "gcvit": "gcvit_xxtiny", "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050", "hardcorenas": "hardcorenas_b", "hgnet": "hgnetv2_b0", "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny", "hrnet": "hrnet_w18_small", "iformer": "iformer_t",
    "inception_next": "inception_next_atto", "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3", "inception_v4": "inception_v4", "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s", "lowformer": "lowformer_b0", "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224", "mobilenetv3": "mobilenetv3_small_050", "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevit_xxs", "mvitv2": "mvitv2_tiny", "naflexvit": "naflexvit_base_patch16_parfac_gap",
    "nasnet": "nasnetalarge", "nest": "nest_tiny", "nextvit": "nextvit_small", "pit": "pit_ti_224",
    "pnasnet": "pnasnet5large", "pvt_v2": "pvt_v2_b0", "qwen3_vit": "qwen3_vit_88m", "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002", "repghost": "repghostnet_050", "repvit": "repvit_m1", "res2net": "res2next50",
    "resnest": "resnest14d", "resnetv2": "resnetv2_18", "rexnet": "rexnet_100", "selecsls": "selecsls42",
    "senet": "legacy_seresnet18", "sequencer": "sequencer2d_s", "shvit": "shvit_s1", "sknet": "skresnet18",
    "starnet": "starnet_s050", "swiftformer": "swiftformer_xs", "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256", "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224", "tnt": "tnt_s_legacy_patch16_224", "tresnet": "tresnet_m",
    "twins": "twins_svt_small", "vgg": "vgg11", "visformer": "visformer_tiny",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224", "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224", "volo": "volo_d1_224", "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception", "xception_aligned": "xception41p", "xcit": "xcit_nano_12_p8_224",
}  # fmt: skip
# Modules not checked here, and why (README lists them too).
DEAD = "with random weights {} is a dead network (its logits are the same for every input), so every map is flat"
SWEEP_FAILS = {"nasnet": DEAD.format("nasnetalarge"), "cspnext": DEAD.format("cspnext_tiny")}
SWEEP_SKIPS = {
    "deepseek_vit": "its smallest architecture has 412M parameters (a minute to build twice on 2 cores); "
    "checked by hand at 224: default layer encoder, channels-last",
}
SIZES = (64, 96, 128, 160, 224, 256)


def _working_size(name: str) -> tuple[int, Classifier]:
    """The smallest input size at which the default layer is found, with the classifier built for it."""
    sizes = [SWEEP_SIZES[name]] if name in SWEEP_SIZES else list(SIZES)
    error: Exception | None = None
    for size in sizes:
        try:
            classifier = load_classifier(f"timm:{name}", "NONE", input_size=size)
            default_target(run_probe(classifier))
            return size, classifier
        except ModelError as exc:
            error = exc
    raise AssertionError(f"{name}: no input size in {sizes} works: {error}")


@pytest.mark.slow
@pytest.mark.parametrize(("module", "name"), _sweep_models(), ids=lambda v: v if isinstance(v, str) else None)
def test_sweep_default_layer_and_gradcam_through_explain(module: str, name: str, tmp_path: Path) -> None:
    if module in SWEEP_SKIPS:
        pytest.skip(SWEEP_SKIPS[module])
    if module in SWEEP_FAILS:
        pytest.xfail(SWEEP_FAILS[module])
    size, classifier = _working_size(name)
    # --weights NONE builds this same model (seed 0); but where timm zero-initialises a head, every map
    # would be flat, so such a model goes in as a checkpoint with that head drawn at random
    weights: object = "NONE"
    state = classifier.module.state_dict()
    zero = [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2 and not v.any()]
    if zero:
        generator = torch.Generator().manual_seed(0)
        state = {k: (torch.randn(v.shape, generator=generator) * 0.02 if k in zero else v).contiguous()
                 for k, v in state.items()}  # fmt: skip
        weights = tmp_path / "random.safetensors"
        safetensors_torch.save_file(state, str(weights))
    del classifier, state
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (size + 7, size - 5, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    result = explain(images, out, "--model", f"timm:{name}", "--weights", weights, "--input-size", size,
                     "--method", "gradcam", "--batch-size", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = records(out)
    assert [line["status"] for line in lines] == ["ok", "ok"], lines
    heats = [np.load(out / line["map"]) for line in lines]
    assert all(np.isfinite(heat).all() for heat in heats)
    # random weights: one of the two maps may be flat (ReLU of a negative sum), not both
    assert any(float(heat.max()) > float(heat.min()) for heat in heats), f"{name}: flat maps at {lines[0]['layer']}"
