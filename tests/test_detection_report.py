"""``camx report`` on a detection run's manifest: every detection's label is a class of the
filter (an image is under each of its detections' classes), a filtered card shows that
class's detections and the class-agnostic maps, and each detection's box is in its caption;
the page's data checked directly, and the filter in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_image
from test_report import page_data
from test_report_browser import Watched, browser  # noqa: F401  (the module's Chromium fixture)

from cam_cli.report import build_report

#: per image, its detections (label, box, score); c.png has none
DETECTIONS = {
    "a.png": [("person", [2.0, 3.0, 20.0, 25.0], 0.9), ("car", [10.0, 1.0, 38.0, 20.0], 0.7)],
    "b.png": [("car", [0.0, 0.0, 30.0, 28.0], 0.8)],
    "c.png": [],
}
LABELS = {"person": 1, "car": 3}


def detection_line(key: str, source: Path, method: str, **fields: object) -> dict:
    """A manifest line as a detection run writes it (settings, then the line's own fields)."""
    line = {"input": str(source), "key": key, "status": "ok", "error": None, "overlay": None, "map": None,
            "class_index": None, "class_name": None, "score": None, "method": method, "task": "detection",
            "model": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "NONE", "layer": "backbone.body.16",
            "target": "all", "min_score": 0.5, "max_detections": 10, "precision": "fp32", "alpha": 0.4,
            "seed": 0, "width": 40, "height": 30}  # fmt: skip
    line.update(fields)
    return line


def detection_run(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    lines = []
    for n, (key, found) in enumerate(DETECTIONS.items()):
        source = write_image(tmp_path / "imgs" / key, 40, 30, seed=n)
        base = {"detections": len(found)}
        for r, (name, box, score) in enumerate(found):
            overlay = f"{key}.gradcam.det{r}.jpg"
            write_image(out / overlay, 40, 30, seed=10 + 3 * n + r, fmt="JPEG")
            lines.append(detection_line(key, source, "gradcam", variant=f"det{r}", detection=r, overlay=overlay,
                                        map=f"{key}.gradcam.det{r}.npy", class_index=LABELS[name],
                                        class_name=name, score=score, det_box=box, **base))  # fmt: skip
        if not found:
            lines.append(detection_line(key, source, "gradcam", variant="det-none", **base))
        shown = [{"class_index": LABELS[name], "class_name": name, "score": s, "det_box": b} for name, b, s in found]
        write_image(out / f"{key}.eigencam.jpg", 40, 30, seed=50 + n, fmt="JPEG")
        lines.append(detection_line(key, source, "eigencam", overlay=f"{key}.eigencam.jpg", map=f"{key}.eigencam.npy",
                                    class_agnostic=True, boxes_shown=shown, **base))  # fmt: skip
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def test_each_detection_label_is_a_class_of_the_filter(tmp_path: Path) -> None:
    data = page_data(build_report(detection_run(tmp_path)))
    assert sorted(data["classes"]) == ["car", "person"]
    items = {item["k"]: item for item in data["items"]}
    named = {k: sorted(data["classes"][c] for c in item.get("cs", [item["c"]] if "c" in item else []))
             for k, item in items.items()}  # fmt: skip
    assert named == {"a.png": ["car", "person"], "b.png": ["car"], "c.png": []}
    boxes = sorted(e["b"] for e in items["a.png"]["m"] if "b" in e)
    assert boxes == sorted(box for _, box, _ in DETECTIONS["a.png"])


def test_the_class_filter_in_chromium(browser, tmp_path: Path) -> None:  # noqa: F811
    out = detection_run(tmp_path)
    view = Watched(browser, out)
    view.open(build_report(out))
    assert view.visible_keys() == ["a.png", "b.png", "c.png"]
    options = view.page.eval_on_selector_all("#f-class option", "nodes => nodes.map(n => n.textContent)")
    assert sorted(options[1:]) == ["car (2)", "person (1)"]
    view.page.select_option("#f-class", label="car (2)")
    assert view.visible_keys() == ["a.png", "b.png"]
    captions = view.page.eval_on_selector_all(
        "#grid .card[data-key='a.png'] figcaption .cls", "nodes => nodes.map(n => n.textContent)"
    )
    # the car's detection map and the class-agnostic one; not the person's
    assert len(captions) == 2 and sum(c.startswith("car") for c in captions) == 1, captions
    assert not any(c.startswith("person") for c in captions), captions
    view.page.select_option("#f-class", label="person (1)")
    assert view.visible_keys() == ["a.png"]
    view.page.select_option("#f-class", "")
    assert view.visible_keys() == ["a.png", "b.png", "c.png"]
    view.check_clean()
