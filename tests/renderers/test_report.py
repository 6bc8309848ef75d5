"""The HTML report: self-contained (every image inlined, nothing fetched), the main views
present with their commands, and the statistics table equal to layer_stats."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import numpy as np
import pytest

from layerscope.cli import main
from layerscope.renderers import ReportOptions, Unembedding, layer_stats, report_html


class Page(HTMLParser):
    """Collects what a self-containment check needs: tags, their attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.rows: list[tuple[str, list[str]]] = []
        self._row: list[str] | None = None
        self._row_class = ""

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        self.stack.append(tag)
        if tag == "tr":
            self._row, self._row_class = [], attrs.get("class", "")

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass
        if tag == "tr" and self._row is not None:
            self.rows.append((self._row_class, self._row))
            self._row = None

    def handle_data(self, data):
        if self.stack:
            self.text.setdefault(self.stack[-1], []).append(data)
            if self._row is not None and self.stack[-1] in ("td", "th"):
                self._row.append(data)


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def report(minilm_trace, minilm):
    import layerscope

    model, tokenizer = minilm
    matrix = model.embeddings.word_embeddings.weight.detach().numpy()
    unembedding = Unembedding(matrix, tokenizer.convert_ids_to_tokens(list(range(len(matrix)))))
    ds = layerscope.open_trace(minilm_trace)
    options = ReportOptions(sample=1, layer=2, head=3, unembedding=unembedding,
                            trace="minilm.zarr")
    return ds, report_html(ds, options)


def test_report_is_self_contained(report):
    _, text = report
    page = _parse(text)
    assert text.startswith("<!DOCTYPE html>")
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) >= 10
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        assert base64.b64decode(attrs["src"][len(prefix):]).startswith(b"\x89PNG")
    for _, attrs in page.tags:  # no reference leaves the file except in-page anchors
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                assert attrs[key].startswith("#"), attrs[key]


def test_report_shows_the_main_views_with_their_commands(report):
    _, text = report
    page = _parse(text)
    assert page.text["h2"] == ["Attention", "Hidden states", "Activations", "Distributions"]
    captions = page.text["figcaption"]
    for caption in ("One head (head 3)", "Layers x heads", "Head view", "Per-head summaries",
                    "Norms", "Trajectories (PCA)", "Layer-to-layer similarity", "Logit lens",
                    "Value histograms"):
        assert caption in captions
    assert any(c.startswith("Neurons x tokens: encoder.layer.0.intermediate@output")
               for c in captions)
    commands = page.text["pre"]
    assert len(commands) == len(captions)
    assert "layerscope render attention minilm.zarr --layer 2 --head 3 --sample 1 -o head.png" \
        in commands
    inputs = page.text["li"]
    assert inputs[:2] == ["The cat sat on the mat.", "Attention is all you need, they said."]


def test_report_statistics_table(report):
    ds, text = report
    page = _parse(text)
    stats = layer_stats(ds)
    body = [(cls, cells) for cls, cells in page.rows if len(cells) == 8 and cells[0] != "variable"]
    assert [cells[0] for _, cells in body] == list(stats["variable"].values)
    name = "encoder.layer.3@output"
    cells = dict((cells[0], cells) for _, cells in body)[name]
    row = stats.sel(variable=name)
    # every value at a real token (token_mask): padding is no value of the text's
    real = int(ds["token_mask"].values.sum())
    assert int(cells[1]) == int(row["count"]) == real * ds.sizes["hidden"]
    assert float(cells[2]) == pytest.approx(float(row["mean"]), rel=1e-3)
    # flagged rows are exactly the variables holding NaN or Inf, checked on every value
    bad = [n for n in stats["variable"].values if not np.isfinite(ds[n].values).all()]
    assert [cells[0] for cls, cells in body if cls == "flag"] == bad
    assert (f"{len(bad)} variable(s) hold NaN or Inf" in text) == bool(bad)


def test_report_flags_nan_rows(tmp_path):
    import layerscope

    from .synthetic import write_trace

    bad = np.ones((2, 4, 8), np.float32)
    bad[1, 2, 3] = np.nan
    path = write_trace(tmp_path / "bad.zarr", [[
        ("blocks.0", "output", np.zeros((2, 4, 8), np.float32), ("batch", "token", "hidden")),
        ("blocks.1", "output", bad, ("batch", "token", "hidden")),
    ]])
    page = _parse(report_html(layerscope.open_trace(path)))
    flagged = [cells[0] for cls, cells in page.rows if cls == "flag"]
    assert flagged == ["blocks.1@output"]
    assert "1 variable(s) hold NaN or Inf" in "".join(page.text["strong"])
    # a trace without attention says so instead of failing
    assert "no attention probabilities in this trace" in "".join(page.text["p"])


def test_report_inline_svg(minilm_trace):
    import layerscope

    ds = layerscope.open_trace(minilm_trace)
    text = report_html(ds, ReportOptions(image_format="svg"))
    page = _parse(text)
    assert not [t for t, _ in page.tags if t == "img"]
    assert len([t for t, _ in page.tags if t == "svg"]) >= 9
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text


def test_report_cli(minilm_trace, tmp_path, capsys):
    import layerscope

    out = tmp_path / "report.html"
    assert main(["report", str(minilm_trace), "-o", str(out), "--layer", "1",
                 "--max-samples", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = _parse(out.read_text(encoding="utf-8"))
    assert "Attention" in page.text["h2"]
    assert "Summaries over the whole trace use samples 0..1 of 3" in "".join(page.text["p"])
    counts = {cells[0]: int(cells[1]) for _, cells in page.rows
              if len(cells) == 8 and cells[0] != "variable"}
    # the first two samples only, at their real tokens
    real = int(layerscope.open_trace(minilm_trace)["token_mask"].values[:2].sum())
    assert counts["encoder.layer.3@output"] == real * 384
    assert main(["report", str(minilm_trace), "-o", str(tmp_path / "r.png")]) == 2
    assert ".html" in capsys.readouterr().err


def test_report_statistics_budget(tmp_path):
    import layerscope

    from .synthetic import write_trace

    path = write_trace(tmp_path / "three.zarr", [[
        (f"blocks.{i}", "output", np.full((2, 4, 8), i, np.float32), ("batch", "token", "hidden"))
        for i in range(3)
    ]])
    options = ReportOptions(stats_budget_bytes=2 * 2 * 4 * 8 * 4)  # room for two variables
    page = _parse(report_html(layerscope.open_trace(path), options))
    rows = [cells[0] for _, cells in page.rows if len(cells) == 8 and cells[0] != "variable"]
    assert rows == ["blocks.0@output", "blocks.1@output"]
    assert "statistics not computed for 1 variable(s)" in "".join(page.text["p"])
    assert "blocks.2@output" in "".join(page.text["p"])


def test_report_opens_from_a_file_in_a_headless_browser(report, tmp_path):
    """Debian's chromium (apt-get install chromium) driven by playwright: the page loads from
    file://, every inlined image decodes, and nothing is fetched from anywhere else."""
    from playwright.sync_api import sync_playwright

    _, text = report
    path = tmp_path / "report.html"
    path.write_text(text, encoding="utf-8")
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: errors.append(message.text)
                    if message.type == "error" else None)
            page.goto(path.as_uri())
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            headings = page.evaluate(
                "Array.from(document.querySelectorAll('h2')).map(h => h.innerText)")
        finally:
            browser.close()
    assert len(images) == text.count("<img ")
    assert all(complete and width > 100 for complete, width in images)
    assert headings == ["Attention", "Hidden states", "Activations", "Distributions"]
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert errors == []
