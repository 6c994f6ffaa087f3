"""`camx report` in a real browser: headless Chromium (Debian's package) driven by Playwright.

What a person would see: every input, every thumbnail loaded, filters and search changing
what is shown, hostile file names shown as text and never run, no request leaving the run's
folder, no console errors. Skipped only where Chromium or Playwright cannot be found.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pytest
from test_report import HOSTILE_KEYS, evaluated_run, hand_run, page_data, real_run, with_boxes

from cam_cli.metrics import statistic
from cam_cli.report import build_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium was not found at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Chromium tests need Playwright for Python (pip install playwright), which was not found")
    with sync_playwright() as play:
        chromium = play.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield chromium
        chromium.close()


def wait_until(page, expression: str, timeout: float = 20.0) -> None:
    """Poll ``expression`` until it is truthy. (Playwright's ``wait_for_function`` evaluates
    strings with ``eval``, which the page's Content-Security-Policy rightly refuses.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)


class Watched:
    """A page with everything a test must see go wrong recorded."""

    def __init__(self, browser, out: Path, viewport_height: int = 900, viewport_width: int = 1400) -> None:
        self.out = out.resolve()
        self.page = browser.new_page(viewport={"width": viewport_width, "height": viewport_height})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

        def dialog(d) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", dialog)

    def open(self, index: Path) -> None:
        self.page.goto(index.resolve().as_uri())
        self.page.wait_for_selector("html[data-ready]")

    def visible_keys(self) -> list[str]:
        return self.page.eval_on_selector_all("#grid .card .key", "nodes => nodes.map(n => n.textContent)")

    def search(self, text: str, expected: list[str]) -> None:
        """Type ``text`` into the search box; exactly ``expected`` must be shown."""
        self.page.fill("#f-search", text)
        deadline = time.monotonic() + 10
        while self.visible_keys() != expected:
            assert time.monotonic() < deadline, f"search {text!r} shows {self.visible_keys()}, not {expected}"
            self.page.wait_for_timeout(50)

    def all_keys_across_pages(self) -> list[str]:
        keys = self.visible_keys()
        while self.page.is_enabled(".pager .next >> nth=0"):
            self.page.click(".pager .next >> nth=0")
            keys += self.visible_keys()
        return keys

    def wait_thumbnails_loaded(self) -> int:
        """Scroll every thumbnail of the page into view; all must load. Returns how many."""
        count = self.page.evaluate(
            """async () => {
                const images = Array.from(document.querySelectorAll('#grid img'));
                for (const image of images) {
                    image.scrollIntoView({block: 'center'});
                    await new Promise(resolve => requestAnimationFrame(resolve));
                }
                return images.length;
            }"""
        )
        wait_until(
            self.page,
            "Array.from(document.querySelectorAll('#grid img')).every(i => i.complete && i.naturalWidth > 0)",
        )
        return count

    def check_clean(self) -> None:
        assert self.dialogs == [], f"a script ran: {self.dialogs}"
        assert self.errors == [], self.errors
        for url in self.requests:
            assert url.startswith("file://"), url
            path = Path(url2pathname(urlparse(url).path)).resolve()
            assert path == self.out or self.out in path.parents, f"request outside OUT: {url}"


def test_a_real_run_in_chromium(browser, image_dir, tiny_factory, tmp_path):
    out = real_run(image_dir, tiny_factory, tmp_path / "out")
    index = build_report(out)
    view = Watched(browser, out)
    view.open(index)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    keys = sorted({r["key"] for r in manifest})
    assert view.visible_keys() == keys
    # the original and both methods' overlays on every card, all loaded
    assert view.wait_thumbnails_loaded() == 6 * 3
    assert view.page.locator("#grid .card").first.locator("figure").count() == 3
    header = view.page.text_content("header.run")
    assert tiny_factory in header and "cam, gradcam" in header
    # hiding a method hides its pictures
    view.page.uncheck("input[data-method='0']")  # cam
    assert view.page.locator("#grid figure[data-method='cam']").count() == 0
    assert view.page.locator("#grid figure[data-method='gradcam']").count() == 6
    # a search by file name
    view.search("sub/", ["sub/d.jpeg", "sub/e.webp"])
    view.check_clean()
    view.page.close()


ROWS = """rows => rows.map(r => ({
    rank: r.cells[0].textContent,
    method: r.cells[1].textContent,
    cells: Object.fromEntries(
        Array.from(r.querySelectorAll("td[data-metric]")).map(c => [c.dataset.metric, c.textContent])
    ),
}))"""


def test_the_header_and_metrics_table_say_what_they_count(browser, image_dir, positive_factory, tmp_path):
    # CAM and Grad-CAM of a GAP + positive linear head: equal maps
    out = evaluated_run(image_dir, positive_factory, tmp_path / "out", *with_boxes(tmp_path))
    index = build_report(out)
    table = page_data(index)["metrics"]
    view = Watched(browser, out, viewport_width=1280)
    view.open(index)
    pairs = "nodes => nodes.map(n => [n.querySelector('dt').textContent, n.querySelector('dd').textContent])"
    facts = dict(view.page.eval_on_selector_all(".facts > div", pairs))
    assert facts["Inputs"] == "6" and facts["Maps"] == "12 (2 methods)" and "Done" not in facts
    assert facts["Failed maps"] == facts["Skipped maps"] == "0"
    # each column titled by the metric registry, its identifier in the tooltip
    heads = view.page.eval_on_selector_all(
        "table.metrics thead th[title]", "nodes => nodes.map(n => [n.getAttribute('title'), n.textContent])"
    )
    arrow = {"lower": " ↓", "higher": " ↑"}
    assert {t: text for t, text in heads if t in table["names"]} == {
        name: statistic(name).title + arrow[table["better"][name]] for name in table["names"]
    }
    assert dict(heads)["increase_in_confidence_pct"] == "Incr. Conf. % ↑"
    # equal maps share rank 1 and neither is bold; pointing and IoU count the 2 images with a box
    rows = view.page.eval_on_selector_all("table.metrics tbody tr", ROWS)
    assert sorted((row["rank"], row["method"]) for row in rows) == [("1", "cam"), ("1", "gradcam")]
    assert view.page.locator("table.metrics td.best").count() == 0
    for row in rows:
        assert row["cells"]["pointing_pct"].endswith(" (n=2)") and row["cells"]["iou"].endswith(" (n=2)")
        assert "(n=" not in row["cells"]["deletion_auc"] and "(n=" not in row["cells"]["average_drop_pct"]
    view.page.screenshot(path=str(tmp_path / "report-1280.png"), full_page=True)
    # a phone: the table scrolls inside its card, the page never sideways
    view.page.set_viewport_size({"width": 390, "height": 844})
    assert view.page.evaluate("document.documentElement.scrollWidth") <= 390
    wrapper = "document.querySelector('.run .table-scroll')"
    scroll_width, client_width = view.page.evaluate(f"[{wrapper}.scrollWidth, {wrapper}.clientWidth]")
    assert scroll_width > client_width, (scroll_width, client_width)
    assert view.page.evaluate(f"({wrapper}.scrollLeft = 100, {wrapper}.scrollLeft)") > 0
    assert view.page.evaluate("document.documentElement.scrollWidth") <= 390
    view.page.screenshot(path=str(tmp_path / "report-390.png"), full_page=True)
    view.check_clean()
    view.page.close()


def test_hostile_names_show_as_text_and_their_links_load(browser, tmp_path):
    per_key = {HOSTILE_KEYS[0]: {"class_name": "<b onmouseover=alert(3)>bold</b>", "score": 0.9}}
    out = hand_run(tmp_path, HOSTILE_KEYS, per_key=per_key)
    index = build_report(out)
    view = Watched(browser, out)
    view.open(index)
    assert sorted(view.visible_keys()) == sorted(HOSTILE_KEYS)
    assert view.wait_thumbnails_loaded() == len(HOSTILE_KEYS) * 3
    # nothing a name holds became an element
    assert view.page.locator("#grid b[onmouseover], img[src='x'], #grid script").count() == 0
    assert view.page.locator("#grid .pred b", has_text="<b onmouseover=alert(3)>bold</b>").count() == 1
    title = view.page.title()
    assert title.startswith("camx report: ")
    hrefs = view.page.eval_on_selector_all("#grid a", "nodes => nodes.map(n => n.href)")
    assert len(hrefs) == len(HOSTILE_KEYS) * 2
    for href in hrefs:
        # every link names an overlay that exists...
        path = Path(url2pathname(urlparse(href).path))
        assert path.is_file(), href
        assert path.resolve().parent == out.resolve() or out.resolve() in path.resolve().parents
    # ...and opens it: a click on the thumbnail shows the full-resolution overlay
    card = view.page.locator("#grid .card").nth(view.visible_keys().index(HOSTILE_KEYS[1]))
    tricky = card.locator("figure[data-method='gradcam'] a")
    with view.page.context.expect_page() as popup:
        tricky.click()
    overlay = popup.value
    overlay.wait_for_load_state()
    assert unquote(urlparse(overlay.url).path).endswith(HOSTILE_KEYS[1] + ".gradcam.jpg")
    assert overlay.evaluate("document.images.length === 1 && document.images[0].naturalWidth") == 40
    overlay.close()
    # searching for a name with # ? % and quotes finds exactly it
    view.search('#b?c%d "q"', [HOSTILE_KEYS[1]])
    view.search("猫", ["ünï 猫.jpg"])
    view.search("<IMG SRC", [HOSTILE_KEYS[0]])  # case-insensitive
    view.search("no such name", [])
    view.check_clean()
    view.page.close()


def test_paging_filters_and_sorting_over_two_pages(browser, tmp_path):
    keys = [f"img_{n:04d}.jpg" for n in range(130)]
    per_key = {
        key: {"class_name": "dog" if n % 3 == 0 else "cat", "score": round(n / 1000, 3)} for n, key in enumerate(keys)
    }
    for key in keys[::50]:
        per_key[key] = {"status": "error", "error": f"cannot decode: {key} is truncated"}
    out = hand_run(tmp_path, keys, methods=("gradcam",), per_key=per_key)
    failed = keys[::50]
    # camx evaluate's lines: deletion AUC falls with the index, so sorting by it (lower first) reverses the names
    metrics = [
        {"key": k, "method": "gradcam", "status": "ok", "deletion_auc": 1 - n / 1000, "insertion_auc": 0.5}
        for n, k in enumerate(keys)
        if k not in failed
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    index = build_report(out)
    view = Watched(browser, out, viewport_height=700)
    view.open(index)
    # the first page only: 100 cards, and pictures below the fold not fetched yet
    assert len(view.visible_keys()) == 100
    thumbs_fetched = [u for u in view.requests if "/thumbs/" in u]
    assert 0 < len(thumbs_fetched) < 100
    assert "of 130 inputs" in view.page.text_content(".summary")
    # every input across the pages, once
    assert view.all_keys_across_pages() == keys
    view.page.click(".pager .prev >> nth=0")
    # the class filter
    view.page.select_option("#f-class", label=f"dog ({sum(1 for k in keys if per_key[k].get('class_name') == 'dog')})")
    dogs = view.all_keys_across_pages()
    assert dogs == [k for k in keys if per_key[k].get("class_name") == "dog"]
    view.page.select_option("#f-class", "")
    # failed only, with their reasons, also in the list of failures
    view.page.check("#f-failed")
    assert view.visible_keys() == failed
    assert view.page.locator("#grid .fig.error .reason").all_text_contents() == [per_key[k]["error"] for k in failed]
    assert view.page.locator("#failures tbody tr").count() == len(failed)
    view.page.uncheck("#f-failed")
    # sort by score, best first
    view.page.select_option("#f-sort", "score")
    scores = view.page.eval_on_selector_all(
        "#grid .card .pred", "nodes => nodes.map(n => parseFloat(n.textContent.split(' ').pop()))"
    )
    ok = [k for k in keys if k not in failed]
    assert scores == sorted(scores, reverse=True) and scores[0] == per_key[ok[-1]]["score"]
    assert view.wait_thumbnails_loaded() == 100 * 2
    # the metrics table, and sorting by a metric, best (lowest deletion AUC) first
    table = view.page.locator("table.metrics tbody tr").all_inner_texts()
    assert len(table) == 1 and table[0].split("\t")[:3] == ["gradcam", str(len(metrics)), "0.935"]
    view.page.select_option("#f-sort", label="deletion_auc (gradcam)")
    assert view.page.input_value("#f-dir") == "asc"
    assert view.visible_keys()[:3] == ok[::-1][:3]
    view.check_clean()
    view.page.close()


def test_a_report_folder_moved_elsewhere_still_opens(browser, tmp_path):
    out = hand_run(tmp_path, ["a b.jpg", "c.jpg"])
    dest = tmp_path / "shared" / "rep ort"
    index = build_report(out, dest)
    moved = tmp_path / "copy"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("copy"))
    view = Watched(browser, moved / "out")
    view.open(moved / "shared" / "rep ort" / "index.html")
    assert view.visible_keys() == ["a b.jpg", "c.jpg"]
    assert view.wait_thumbnails_loaded() == 6
    for href in view.page.eval_on_selector_all("#grid a", "nodes => nodes.map(n => n.href)"):
        assert Path(url2pathname(urlparse(href).path)).is_file(), href
    assert index.is_file()
    view.out = tmp_path / "copy"  # the page's requests stay inside the moved tree
    view.check_clean()
    view.page.close()


def test_a_similarity_run_opens_with_the_most_alike_first(browser, tmp_path):
    from test_report import similarity_run

    out = similarity_run(tmp_path)
    view = Watched(browser, out)
    view.open(build_report(out))
    assert view.visible_keys() == ["c.png", "d.png", "a.png", "b.png"]
    assert view.page.input_value("#f-sort") == "score" and view.page.input_value("#f-dir") == "desc"
    view.page.select_option("#f-sort", "key")
    assert view.visible_keys() == ["a.png", "b.png", "c.png", "d.png"]
    view.check_clean()
    view.page.close()
