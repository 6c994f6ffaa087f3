"""The user's own models through `camx explain`: exported programs, factories,
tuple and dict outputs, fine-tuned state dicts, labels, TorchScript refused,
and `--target topK`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import make_tiny

from cam_cli.cli import main

RUN = ["--device", "cpu", "--workers", "0", "-q"]


def explain(image_dir: Path, out: Path, *args: object) -> object:
    return CliRunner().invoke(main, ["explain", str(image_dir), "-o", str(out), *RUN, *(str(a) for a in args)])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def maps(out: Path) -> dict[str, np.ndarray]:
    return {r["input"]: np.load(out / r["map"]) for r in records(out)}


@pytest.fixture
def own_models(tiny_factory: str, tmp_path: Path) -> str:
    """``own_models`` importable from the working directory: tuple, dict and plain heads over TinyNet."""
    (tmp_path / "own_models.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import torch\n"
        "from conftest import make_tiny\n"
        "class Wrapped(torch.nn.Module):\n"
        "    def __init__(self, kind):\n"
        "        super().__init__()\n"
        "        self.net, self.kind = make_tiny(), kind\n"
        "    def forward(self, x):\n"
        "        embedding = self.net.pool(self.net.features(x)).flatten(1)\n"
        "        logits = self.net.fc(embedding)\n"
        "        if self.kind == 'tuple':\n"
        "            return logits, torch.zeros_like(logits)  # (logits, aux) like Inception\n"
        "        return {'embedding': embedding, 'scores': logits}\n"
        "def tuple_model():\n"
        "    return Wrapped('tuple')\n"
        "def dict_model():\n"
        "    return Wrapped('dict')\n"
    )
    return tiny_factory


def test_factory_tuple_and_dict_outputs_give_the_plain_models_maps(own_models, image_dir, tmp_path):
    result = explain(image_dir, tmp_path / "plain", "--model", own_models, "--input-size", "32")
    assert result.exit_code == 0, result.output
    assert {r["layer"] for r in records(tmp_path / "plain")} == {"features"}
    expected = maps(tmp_path / "plain")
    assert len(expected) == 6

    # a tuple of several outputs is never guessed: the user names the logits' index
    result = explain(image_dir, tmp_path / "tuple", "--model", "own_models:tuple_model", "--input-size", "32")
    assert result.exit_code == 1, result.output
    assert "a tuple of 2 outputs; say which holds the logits with --output-key 0..1" in result.output
    result = explain(
        image_dir, tmp_path / "tuple", "--model", "own_models:tuple_model", "--input-size", "32", "--output-key", "2"
    )
    assert result.exit_code == 1 and "use an index 0..1" in result.output
    result = explain(
        image_dir, tmp_path / "tuple", "--model", "own_models:tuple_model", "--input-size", "32", "--output-key", "0"
    )
    assert result.exit_code == 0, result.output
    assert {r["layer"] for r in records(tmp_path / "tuple")} == {"net.features"}
    result = explain(image_dir, tmp_path / "t", "--model", own_models, "--input-size", "32", "--output-key", "0")
    assert result.exit_code == 1 and "returns a single tensor" in result.output

    result = explain(image_dir, tmp_path / "dict", "--model", "own_models:dict_model", "--input-size", "32")
    assert result.exit_code == 1, result.output
    assert "['embedding', 'scores']; name the logits with --output-key" in result.output
    result = explain(
        image_dir, tmp_path / "dict", "--model", "own_models:dict_model", "--input-size", "32", "--output-key", "scores"
    )
    assert result.exit_code == 0, result.output
    for out in ("tuple", "dict"):
        got = maps(tmp_path / out)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], atol=1e-6)


def test_exported_program_keeps_layer_names_and_matches_the_eager_model(tiny_factory, image_dir, tmp_path):
    model = make_tiny()
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, path)
    for method in ("gradcam", "cam"):
        result = explain(image_dir, tmp_path / f"eager-{method}", "--model", tiny_factory, "--input-size", "32",
                         "--method", method)  # fmt: skip
        assert result.exit_code == 0, result.output
        # no --input-size: the program's own 32x32 is used
        result = explain(image_dir, tmp_path / f"pt2-{method}", "--model", path, "--method", method)
        assert result.exit_code == 0, result.output
        assert {r["layer"] for r in records(tmp_path / f"pt2-{method}")} == {"features"}
        eager, exported = maps(tmp_path / f"eager-{method}"), maps(tmp_path / f"pt2-{method}")
        assert eager.keys() == exported.keys()
        for key in eager:
            np.testing.assert_allclose(exported[key], eager[key], atol=1e-5)


def test_an_exported_program_refuses_weights_and_num_classes_it_cannot_take(image_dir, tmp_path):
    path = tmp_path / "tiny.pt2"
    program = torch.export.export(
        make_tiny(), (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    torch.export.save(program, path)
    torch.save(make_tiny(seed=1).state_dict(), tmp_path / "other.pth")
    for extra in (["--weights", tmp_path / "other.pth"], ["--num-classes", "7"]):
        result = explain(image_dir, tmp_path / "out", "--model", path, *extra)
        assert result.exit_code == 1, result.output
        assert result.output == (
            f"camx: error: --weights and --num-classes do not apply to {path}: an exported program carries its own "
            "weights and head; export the model again with the weights you want\n"
        )
    assert not (tmp_path / "out").exists()


def test_gradcam_on_an_output_that_does_not_depend_on_the_layer_is_refused_before_the_run(own_models, image_dir,
                                                                                           tmp_path):  # fmt: skip
    out = tmp_path / "out"
    result = explain(image_dir, out, "--model", "own_models:tuple_model", "--input-size", "32", "--output-key", "1")
    assert result.exit_code == 1
    assert result.output == (
        "camx: error: gradcam: the model's output does not depend on layer net.features, so there is no gradient "
        "to follow; choose another --layer (or --output-key)\n"
    )
    assert not out.exists()


def test_exported_program_with_a_fixed_batch_is_refused_with_the_fix(image_dir, tmp_path):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(make_tiny(), (torch.randn(1, 3, 32, 32),)), path)
    result = explain(image_dir, tmp_path / "out", "--model", path)
    assert result.exit_code == 1, result.output
    assert "exported for a fixed batch of 1" in result.output and "Dim.DYNAMIC" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_because_it_takes_no_hooks(how, image_dir, tmp_path):
    model = make_tiny()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(1, 3, 32, 32))
    path = tmp_path / "tiny.pt"
    torch.jit.save(scripted, str(path))
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):  # why camx refuses
        torch.jit.load(str(path)).features.register_forward_hook(lambda *_: None)
    result = explain(image_dir, tmp_path / "out", "--model", path)
    assert result.exit_code == 1, result.output
    assert "is a TorchScript file" in result.output and "torch.export.save" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()


def test_fine_tuned_state_dict_infers_the_classes_and_takes_labels(image_dir, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tuned.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"kind {i}\n" for i in range(7)))
    out = tmp_path / "out"
    result = explain(image_dir, out, "--model", "resnet18", "--weights", path, "--labels", labels, "--input-size", "64")
    assert result.exit_code == 0, result.output
    found = records(out)
    assert len(found) == 6
    for record in found:
        assert 0 <= record["class_index"] < 7 and record["class_name"] == f"kind {record['class_index']}"
        assert record["weights"] == str(path)


def test_a_weights_pickle_that_would_run_code_is_refused(image_dir, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, path)
    result = explain(image_dir, tmp_path / "out", "--model", "resnet18", "--weights", path)
    assert result.exit_code == 1, result.output
    assert f"refusing to load {path}" in result.output and result.output.count("\n") == 1
    assert not marker.exists()


def test_top_k_writes_k_maps_per_image_named_by_rank(tiny_factory, image_dir, tmp_path):
    out = tmp_path / "out"
    result = explain(image_dir, out, "--model", tiny_factory, "--input-size", "32", "--target", "top3")
    assert result.exit_code == 0, result.output
    found = records(out)
    assert len(found) == 6
    for record in found:
        targets = record["targets"]
        assert [t["rank"] for t in targets] == [1, 2, 3]
        assert len({t["class_index"] for t in targets}) == 3
        assert [t["score"] for t in targets] == sorted((t["score"] for t in targets), reverse=True)
        assert (record["class_index"], record["map"]) == (targets[0]["class_index"], targets[0]["map"])
        for rank, target in enumerate(targets, start=1):
            assert target["map"].endswith(f".gradcam.top{rank}.npy") and target["overlay"].endswith(f".top{rank}.jpg")
            assert np.load(out / target["map"]).shape == (record["height"], record["width"])
            assert (out / target["overlay"]).is_file()
    written = sorted(p.name for p in out.rglob("*.npy"))
    assert len(written) == 18


def test_a_model_that_gives_nan_is_refused_or_fails_its_images_and_the_manifest_stays_json(
    tiny_factory, image_dir, tmp_path
):
    broken = make_tiny()
    broken.fc.bias[2] = float("nan")  # NaN on every input: refused before anything is written
    torch.save(broken.state_dict(), tmp_path / "broken.pth")
    for method in ("gradcam", "cam"):
        result = explain(image_dir, tmp_path / "refused", "--model", tiny_factory, "--weights",
                         tmp_path / "broken.pth", "--input-size", "32", "--method", method)  # fmt: skip
        assert result.exit_code == 1
        assert result.output == (
            f"camx: error: {tiny_factory} gives non-finite logits (NaN or inf) on a random 32x32 input; "
            "check --weights\n"
        )
        assert not (tmp_path / "refused").exists()

    # NaN only for some inputs (here: large ones, as a wrong --std makes them): those images fail
    (tmp_path / "nan_models.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import torch\n"
        "from conftest import make_tiny\n"
        "class NanOnLarge(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = make_tiny()\n"
        "    def forward(self, x):\n"
        "        large = x.flatten(1).abs().amax(1, keepdim=True) > 100\n"
        "        return self.net(x).masked_fill(large, float('nan'))\n"
        "def build():\n"
        "    return NanOnLarge()\n"
    )
    for method in ("gradcam", "cam"):
        out = tmp_path / method
        result = explain(image_dir, out, "--model", "nan_models:build", "--input-size", "32", "--method", method,
                         "--mean", "0", "0", "0", "--std", "0.001", "0.001", "0.001")  # fmt: skip
        assert result.exit_code == 3, result.output
        lines = (out / "manifest.jsonl").read_text().splitlines()
        assert len(lines) == 6

        def refuse(constant: str) -> None:
            raise AssertionError(f"{constant} in the manifest is not JSON")

        for line in lines:
            record = json.loads(line, parse_constant=refuse)
            assert record["status"] == "error" and "non-finite values (NaN or inf)" in record["error"]
        assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]


def test_a_factory_that_cannot_be_imported_says_where_it_is_looked_for(image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = explain(image_dir, tmp_path / "out", "--model", "mymods:build", "--input-size", "32")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "cannot import 'mymods' for --model mymods:build: No module named 'mymods'" in result.output
    assert f"imported from the current folder ({tmp_path}) or PYTHONPATH" in result.output
