"""The complexity metrics (sparseness, complexity, effective-complexity): hand-computed
cases, ``camx evaluate`` end to end without a model, and Quantus 0.6 itself on real
camx maps of the sample photos (non-square)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cam_cli import rundir
from cam_cli.cli import main
from cam_cli.cli.evaluate import evaluate
from cam_cli.metrics import METRICS
from cam_cli.metrics.complexity import complexity, complexity_values, effective_complexity, sparseness

FAST = ["--device", "cpu", "--workers", "0"]
NAMES = "sparseness,complexity,effective-complexity"


def explain(images: Path, out: Path, methods: str = "gradcam,cam,random") -> Path:
    """A real ``camx explain`` run of the tiny seeded model over ``images``."""
    result = CliRunner().invoke(
        main,
        ["explain", str(images), "-o", str(out), "--model", "tinynet_module:build", "--weights", "NONE"]
        + ["--method", methods, *FAST, "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return out


def run(out: Path, *args: str) -> tuple[int, dict, str]:
    """``camx evaluate OUT --json ...``: exit status, the JSON object, stderr."""
    result = CliRunner().invoke(evaluate, [str(out), *FAST, "--json", *args], catch_exceptions=False)
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


def lines_of(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["key"], r["method"]): r for r in rundir.read_records(out / "metrics.jsonl")}


def image_batch(path: Path) -> np.ndarray:
    """The photo as Quantus's ``x_batch`` ``(1, 3, H, W)`` in [0, 1]."""
    with Image.open(path) as image:
        return (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


def test_hand_computed_cases() -> None:
    count = 12
    uniform = np.ones((3, 4))
    hot = np.zeros((3, 4))
    hot[1, 2] = 1.0
    assert sparseness(uniform) == pytest.approx(0.0, abs=1e-9)
    # Gini of one hot pixel among P: (P - 1)/P (up to Quantus's 1e-7 shift)
    assert sparseness(hot) == pytest.approx((count - 1) / count, abs=1e-5)
    assert complexity(uniform) == pytest.approx(math.log(count))
    assert complexity(hot) == pytest.approx(0.0, abs=1e-9)
    two = np.array([[1.0, 1.0, 0.0, 0.0]])
    assert complexity(two) == pytest.approx(math.log(2))
    assert effective_complexity(np.array([[0.0, 1e-6, 2e-5, 0.5, 1.0]])) == 3
    assert effective_complexity(np.array([[0.0, 1e-6, 2e-5, 0.5, 1.0]]), eps=0.4) == 2
    # each map scaled by its own maximum: half the map is the same map
    ramp = np.linspace(0, 1, 20).reshape(4, 5)
    assert effective_complexity(0.5 * ramp, eps=0.5) == effective_complexity(ramp, eps=0.5) == 10
    assert sparseness(0.5 * ramp) == pytest.approx(sparseness(ramp))
    # an all-zero (flat) map: no distribution to take the entropy of
    zeros = np.zeros((4, 4))
    assert complexity_values(zeros, ["sparseness", "complexity", "effective-complexity"], 1e-5) == {
        "sparseness": 0.0,
        "complexity": None,
        "effective_complexity": 0,
    }


def test_registry_entries_say_which_way_is_better() -> None:
    assert METRICS["sparseness"].better == ("higher",)
    assert METRICS["complexity"].better == ("lower",)
    assert METRICS["effective-complexity"].better == ("lower",)
    assert all(METRICS[n].family == "complexity" and METRICS[n].entry is None for n in NAMES.split(","))


def test_evaluate_scores_complexity_without_a_model_and_resumes(
    tiny_factory: str, image_dir: Path, tmp_path: Path
) -> None:
    out = explain(image_dir, tmp_path / "out")
    code, payload, stderr = run(out, "--metrics", NAMES)
    assert code == 0, stderr
    assert payload["done"] == 18 and payload["forward_passes"] == 0  # no model pass at all
    lines = lines_of(out)
    for line in lines.values():
        norm_map = np.load(out / line["map"])
        assert line["sparseness"] == pytest.approx(sparseness(norm_map), abs=1e-6)
        assert line["complexity"] == pytest.approx(complexity(norm_map), abs=1e-6)
        assert line["effective_complexity"] == effective_complexity(norm_map)
        assert line["complexity_eps"] == 1e-5 and "steps" not in line
    summary = payload["summary"]["methods"]["gradcam"]["metrics"]
    assert summary["sparseness"]["better"] == "higher" and summary["complexity"]["better"] == "lower"
    assert summary["effective_complexity"]["n"] == 6
    table = CliRunner().invoke(evaluate, [str(out), *FAST, "--metrics", NAMES, "-q"])
    assert table.exit_code == 0, table.output
    assert "sparseness ↑" in table.output and "complexity ↓" in table.output and "eff. complexity ↓" in table.output
    # a re-run skips everything; another eps redoes the effective complexity alone
    assert run(out, "--metrics", NAMES)[1]["skipped"] == 18
    code, payload, _ = run(out, "--metrics", NAMES, "--complexity-eps", "0.5")
    assert code == 0 and payload["done"] == 18
    after = lines_of(out)
    for key, line in after.items():
        assert line["sparseness"] == lines[key]["sparseness"] and line["complexity_eps"] == 0.5
        assert line["effective_complexity"] == effective_complexity(np.load(out / line["map"]), 0.5)
    assert any(after[k]["effective_complexity"] < lines[k]["effective_complexity"] for k in after)


@pytest.mark.slow
def test_complexity_equals_quantus_on_camx_maps_of_the_photos(
    tiny_factory: str, sample_dir: Path, tmp_path: Path
) -> None:
    """Quantus 0.6's Sparseness, Complexity and EffectiveComplexity with their defaults
    (abs, normalise_by_max) on the same maps: camx's lines equal them to 1e-4."""
    quantus = pytest.importorskip("quantus")
    out = explain(sample_dir, tmp_path / "out")
    code, payload, stderr = run(out, "--metrics", NAMES, "--complexity-eps", "0.01")
    assert code == 0, stderr
    lines = lines_of(out)
    assert len(lines) == 12
    shapes = set()
    for (key, method), line in lines.items():
        norm_map = np.load(out / line["map"])
        shapes.add(norm_map.shape)
        x = image_batch(sample_dir / key)
        assert x.shape[2:] == norm_map.shape
        found = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for field, metric in (
                ("sparseness", quantus.Sparseness(disable_warnings=True)),
                ("complexity", quantus.Complexity(disable_warnings=True)),
                ("effective_complexity", quantus.EffectiveComplexity(eps=0.01, disable_warnings=True)),
            ):
                a = norm_map[None, None].copy()  # Quantus changes a_batch in place
                found[field] = float(metric(model=None, x_batch=x, y_batch=np.array([0]), a_batch=a)[0])
        assert line["sparseness"] == pytest.approx(found["sparseness"], abs=1e-4), (key, method)
        assert line["complexity"] == pytest.approx(found["complexity"], abs=1e-4), (key, method)
        assert line["effective_complexity"] == found["effective_complexity"], (key, method)
    assert any(h != w for h, w in shapes)  # non-square photos among them
