"""SESS (``--method sess``) against pytorch-grad-cam 1.5.7's ``SESS``, its chunks, its stop
and its options through the CLI. Few scales keep it cheap; the default's 12 are marked slow."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_method_parity import MODELS, SIZE, batch, frozen, make_bnnet, minmax, ours, reshape_for, target_of

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.errors import ModelError
from cam_cli.methods import BatchExplainer, MethodOptions, Setup, create
from cam_cli.methods.sess import Layout, gaussian_blur, linear_table
from cam_cli.models import Classifier
from cam_cli.probe import default_target, run_probe


def pgc_sess(model_key: str, x: torch.Tensor, classes: torch.Tensor, scales: int, base: str = "gradcam") -> np.ndarray:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = MODELS[model_key]().requires_grad_(True)
    target = target_of(frozen(MODELS[model_key]()))
    base_method = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM}[base]
    layer = model.get_submodule(target.name)
    with pgc.SESS(model, [layer], reshape_transform=reshape_for(model_key, target), base_method=base_method,
                  num_scales=scales, batch_size=5) as cam:  # fmt: skip
        return cam(x, [ClassifierOutputTarget(int(c)) for c in classes])


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("model_key", list(MODELS))
def test_sess_equals_pytorch_grad_cams(model_key: str, n: int) -> None:
    x = batch(n, seed=n)
    mine, classes = ours("sess", frozen(MODELS[model_key]()), x, sess_scales=3)
    theirs = pgc_sess(model_key, x, classes, 3)
    assert np.isfinite(mine).all() and mine.max() == 1.0
    for i in range(n):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"{model_key} image {i}")


@pytest.mark.parametrize("base", ["gradcam++", "layercam"])
def test_sess_with_another_base_equals_pytorch_grad_cams(base: str) -> None:
    x = batch(2, seed=3)
    mine, classes = ours("sess", frozen(make_bnnet()), x, sess_scales=3, sess_base=base)
    theirs = pgc_sess("bnnet", x, classes, 3, base)
    for i in range(2):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"{base} image {i}")


@pytest.mark.slow
def test_sess_with_the_default_scales_equals_pytorch_grad_cams() -> None:
    x = batch(2, seed=5)
    mine, classes = ours("sess", frozen(MODELS["tiny"]()), x)
    theirs = pgc_sess("tiny", x, classes, 12)
    for i in range(2):
        np.testing.assert_allclose(mine[i], minmax(theirs[i]), atol=1e-4, err_msg=f"image {i}")


def test_layout_blur_and_tables_are_opencvs_and_pytorch_grad_cams() -> None:
    import cv2
    from pytorch_grad_cam.sess import sliding_window

    layout = Layout(224, 224, 12)
    assert len(layout) == 122  # the "about 120 base maps" of an image at 224 pixels
    expected = []
    for index, (h, w) in enumerate(layout.sizes):
        assert h == w == 224 + 64 * index
        expected += [(index, x1, y1) for x1, y1 in sliding_window(h, w, 224, 224)]
    assert layout.patches == expected
    rng = np.random.default_rng(0)
    image = rng.random((37, 41), dtype=np.float32)
    blurred = gaussian_blur(torch.from_numpy(image)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(blurred, cv2.GaussianBlur(image, (11, 11), 5.0, 0), atol=1e-6)
    for source, target in [(7, 32), (41, 32), (288, 224), (928, 224)]:
        low, high, w0, w1 = linear_table(source, target)
        column = rng.random(source, dtype=np.float32)
        mine = column[low.numpy()] * w0.numpy() + column[high.numpy()] * w1.numpy()
        theirs = cv2.resize(column[:, None], (1, target))[:, 0]
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
        assert ((mine == 0) == (theirs == 0)).all()


def explainer_for(scales: int, layer_count: int = 1) -> tuple[BatchExplainer, list[int]]:
    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    method = create("sess", MethodOptions(sess_scales=scales))
    method.prepare(Setup(probe, default_target(probe), model, model, torch.device("cpu")))
    assert method.passes_per_image == len(Layout(SIZE, SIZE, scales))
    sizes: list[int] = []
    counting = lambda t: (sizes.append(len(t)), model(t))[1]  # noqa: E731
    return BatchExplainer(counting, model, default_target(probe), [method]), sizes


def test_sess_fills_full_batches_counts_its_passes_and_stops_after_finished_images() -> None:
    explainer, sizes = explainer_for(3)
    per_image = len(Layout(SIZE, SIZE, 3))  # 9
    passes: list[int] = []
    explainer.batch_size, explainer.on_passes = 4, passes.append
    choose = lambda lg: lg.argmax(1, keepdim=True)  # noqa: E731
    whole = explainer.explain(batch(3), choose)
    total = 3 * per_image
    assert sizes == [3] + [4] * (total // 4) + [total % 4], "the patches of the images mixed in full chunks"
    assert sum(passes) == total
    stop = threading.Event()
    explainer.batch_size = per_image + 2  # the first chunk finishes image 0 and starts image 1
    explainer.stop, explainer.on_passes = stop, lambda n: stop.set()
    part = explainer.explain(batch(3), choose)
    assert part.stopped and len(part.logits) == 1
    torch.testing.assert_close(part.maps["sess"], whole.maps["sess"][:1], atol=1e-6, rtol=0)
    explainer.batch_size = per_image - 1  # no image finished
    with pytest.raises(Exception, match="stopped"):
        explainer.explain(batch(3), choose)


def test_sess_refuses_several_layers_in_one_line() -> None:
    model = frozen(make_bnnet())
    probe = run_probe(Classifier(module=model, name="m", weights="seeded", input_size=SIZE))
    target = default_target(probe)
    with pytest.raises(ModelError, match="sess reads one --layer"):
        create("sess").prepare(Setup(probe, target, model, model, torch.device("cpu"), (target, target)))


def test_sess_through_the_cli_records_its_options_and_refuses_a_bad_base(image_dir, tiny_factory, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    args = ["explain", str(image_dir), "-o", str(out), "--model", tiny_factory, "--weights", "NONE", "--device", "cpu",
            "-q", "--json", "--workers", "0", "--input-size", "32", "--batch-size", "5",
            "--method", "gradcam,sess", "--sess-scales", "2", "--sess-base", "gradcam++"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["timings"]["extra_passes"] > 0
    records = rundir.load_manifest(out / "manifest.jsonl")
    keys = {key for key, _ in records}
    for key in keys:
        record = records[(key, "sess")]
        assert record["status"] == "ok" and (record["sess_base"], record["sess_scales"]) == ("gradcam++", 2)
        assert "sess_base" not in records[(key, "gradcam")]
        saved = np.load(out / f"{key}.sess.npy")
        assert saved.min() == 0.0 and saved.max() == 1.0
    bad = CliRunner().invoke(main, [*args[:-1], "cam"])
    assert bad.exit_code == 2 and "--sess-base" in bad.output


def test_sess_from_the_api_takes_its_options() -> None:
    import cam_cli
    from cam_cli.errors import CamxError

    model = frozen(make_bnnet())
    x = batch(2, seed=6)
    result = cam_cli.explain(model, x, methods="sess", sess_scales=2, sess_base="layercam")["sess"]
    mine, _ = ours("sess", model, x, sess_scales=2, sess_base="layercam")
    np.testing.assert_allclose(result.maps.numpy(), mine, atol=1e-5)
    with pytest.raises(CamxError, match="sess_scales must be at least 1"):
        cam_cli.explain(model, x, methods="sess", sess_scales=0)
    with pytest.raises(ModelError, match="--sess-base cam is not one of"):
        cam_cli.explain(model, x, methods="sess", sess_base="cam")
