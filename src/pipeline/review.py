"""The pairs nearest dedup's threshold, for a person to check: `top_pairs.png`, a picture, and
`review.html`, a page to mark each pair same or different.

The page is one self-contained file, opened from disk with no server and no network: its
style, script and data inline, each image a thumbnail (at most THUMBNAIL_SIDE pixels a side,
JPEG, as a data URI; read and decoded as the extraction decodes, so a hostile file is refused
the same way), never the original. It shows the pairs in order of similarity, the threshold as
a band between those above it (kept as near-duplicates) and those below, PAGE_SIZE a page. The
keys (the page lists them): s or y marks the pair in focus same, d or n different, u clears it,
the arrows move (up/down a pair, left/right a page), w saves the decisions as `review.csv`
(`image_a`, `image_b`, `similarity`, `decision`), which `dedup.reviewed` reads back
(`search.reviewed`). Decisions are kept in the browser's localStorage under the output folder's
path, so they survive a reload and a rerun of dedup for the pairs it shows again; the pairs of
`dedup.reviewed`, when set, are shown marked.

Without the images (no `images_root` holds them) the page shows the ids in their place, and
says why: the ids are paths under the image folder, for a person who has it elsewhere.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 80
PAGE_SIZE = 20


def top_pairs_figure(
    pairs: pd.DataFrame, ids: list[str], root: Path, threshold: float, title: str
) -> Figure:
    """The given pairs (`around_threshold`'s) in a grid, most similar first, a line at the
    threshold between those kept and those not; with no pairs, a figure that says so (the file
    is still written, for DVC and for whoever looks)."""
    from matplotlib.figure import Figure

    from pipeline.pictures import Pair, Shown, pairs_figure, short

    if pairs.empty:
        figure = Figure(figsize=(5, 1))
        figure.text(0.5, 0.5, f"{title}: no pairs", ha="center", va="center")
        return figure
    shown = [
        Pair(Shown(root / ids[a], short(ids[a])), Shown(root / ids[b], short(ids[b])), s)
        for a, b, s in zip(pairs["a"], pairs["b"], pairs["similarity"], strict=True)
    ]
    above = [pair for pair in shown if pair.similarity >= threshold]
    below = [pair for pair in shown if pair.similarity < threshold]
    return pairs_figure(above, below, threshold, title)


def thumbnail_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A small JPEG of the image file as a data URI (its longer side at most `side` pixels);
    None, with a warning, for a file that cannot be read as an image."""
    from pipeline.images.formats import ImageError
    from pipeline.images.thumbnails import thumbnail_jpeg

    try:
        data = thumbnail_jpeg(path, side, THUMBNAIL_QUALITY)
    except (OSError, ImageError) as err:
        log.warning("review.html shows no picture of %s: %s", path, err)
        return None
    return f"data:image/jpeg;base64,{base64.b64encode(data).decode()}"


def write_review_page(
    path: Path,
    pairs: pd.DataFrame,
    ids: list[str],
    root: Path | None,
    threshold: float,
    title: str,
    decided: Sequence[tuple[str, str, str]] = (),
) -> Path:
    """review.html at `path`: `pairs` (a, b, similarity: rows of `ids`, most similar first)
    with thumbnails of the images under `root` (None: their ids only), `decided` (image_a,
    image_b, decision) shown marked until the person changes them."""
    rows = [
        {"a": ids[a], "b": ids[b], "similarity": round(float(s), 6), "above": bool(s >= threshold)}
        for a, b, s in zip(pairs["a"], pairs["b"], pairs["similarity"], strict=True)
    ]
    shown = sorted({row[side] for row in rows for side in ("a", "b")})
    thumbs = {} if root is None else {i: thumbnail_uri(root / i) for i in shown}
    data = {
        "title": title,
        "threshold": round(float(threshold), 6),
        "storage": f"pipeline-review:{path.resolve().parent}",
        "page_size": PAGE_SIZE,
        "pairs": rows,
        "thumbs": {i: uri for i, uri in thumbs.items() if uri is not None},
        "decided": [list(d) for d in decided],
        "note": ""
        if root is not None
        else "No pictures: no images_root holds the images (set images_root=<their folder> "
        "and run dedup again); the ids are their paths under it.",
    }
    path.write_text(review_page(data), encoding="utf-8")
    return path


def review_page(data: dict) -> str:
    """The page's HTML: PAGE, with `data` as JSON where the script reads it ("<" escaped, so
    no id or title can end the script element)."""
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    page = PAGE.replace("/*STYLE*/", STYLE).replace("/*SCRIPT*/", SCRIPT)
    return page.replace("/*DATA*/", payload)  # last: nothing in the data is replaced


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f2f2f2; color: #222; }
header { position: sticky; top: 0; z-index: 1; background: #fff; padding: 8px 16px;
  border-bottom: 1px solid #bbb; }
h1 { font-size: 18px; margin: 0 0 4px; }
header p { margin: 2px 0; }
kbd { border: 1px solid #999; border-bottom-width: 2px; border-radius: 3px; padding: 0 4px;
  background: #f6f6f6; font: 12px monospace; }
#note { color: #a04000; font-weight: bold; }
#legend span { margin-right: 14px; white-space: nowrap; }
#saved { color: #1e7b34; margin-left: 8px; }
main { padding: 4px 16px; }
.pair { display: grid; grid-template-columns: 3.5em 164px 164px 1fr; gap: 12px;
  align-items: center; margin: 6px 0; padding: 6px; background: #fff; border-radius: 4px;
  border: 3px solid transparent; border-left: 8px solid var(--side); cursor: pointer; }
.pair.above { --side: #d35400; }
.pair.below { --side: #2874a6; }
.pair.same { background: #e3f4e8; }
.pair.different { background: #fbe6e4; }
.pair.focus { border-color: #f1c40f; box-shadow: 0 0 0 3px #f7dc6f; }
.n { color: #777; text-align: right; }
.thumb { width: 160px; height: 160px; display: flex; align-items: center; justify-content: center;
  background: #e4e4e4; overflow: hidden; font: 11px monospace; word-break: break-all;
  text-align: center; }
.thumb img { max-width: 160px; max-height: 160px; }
.sim { font-size: 22px; font-weight: bold; }
.side { font-size: 12px; color: var(--side); font-weight: bold; }
.ids { font: 12px monospace; word-break: break-all; color: #444; }
.decision { font-weight: bold; margin: 4px 0; }
.same .decision { color: #1e7b34; }
.different .decision { color: #b03a2e; }
.threshold { margin: 10px 0; padding: 6px; text-align: center; font-weight: bold;
  border-radius: 4px; background: repeating-linear-gradient(45deg, #f4d03f, #f4d03f 12px,
  #f9e79f 12px, #f9e79f 24px); }
nav { padding: 8px 16px 32px; }
button { font: inherit; padding: 2px 10px; }
"""

SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("review-data").textContent);
  var pairs = data.pairs, size = data.page_size;
  var above = pairs.filter(function (p) { return p.above; }).length;
  var pages = Math.max(1, Math.ceil(pairs.length / size));
  var decisions = {};
  function key(a, b) { return a < b ? a + "\\n" + b : b + "\\n" + a; }
  function decision(i) { return decisions[key(pairs[i].a, pairs[i].b)] || null; }
  data.decided.forEach(function (d) { decisions[key(d[0], d[1])] = d[2]; });
  try {
    Object.assign(decisions, JSON.parse(localStorage.getItem(data.storage) || "{}"));
  } catch (e) { /* no storage: decisions last as long as the page */ }
  function store() {
    try { localStorage.setItem(data.storage, JSON.stringify(decisions)); } catch (e) { }
  }
  var focus = 0;
  while (focus < pairs.length - 1 && decision(focus)) focus++;
  if (pairs.length && decision(focus)) focus = 0;
  var main = document.getElementById("pairs"), shown = -1;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pageOf(i) { return Math.floor(i / size); }
  function thumb(id) {
    var box = el("div", "thumb"), uri = data.thumbs[id];
    if (uri) { var img = el("img"); img.src = uri; img.alt = id; box.appendChild(img); }
    else box.textContent = id;
    return box;
  }
  function band() {
    return el("div", "threshold", "threshold " + data.threshold.toFixed(3) +
      ": above, kept as near-duplicates \\u2191 \\u00b7 \\u2193 below, not kept");
  }
  function row(i) {
    var p = pairs[i], r = el("div", "pair " + (p.above ? "above" : "below"));
    r.id = "pair-" + i;
    r.appendChild(el("div", "n", "#" + (i + 1)));
    r.appendChild(thumb(p.a));
    r.appendChild(thumb(p.b));
    var info = el("div", "info");
    info.appendChild(el("div", "sim", p.similarity.toFixed(3)));
    info.appendChild(el("div", "side", p.above ? "above the threshold: kept" :
      "below the threshold: not kept"));
    info.appendChild(el("div", "ids", p.a));
    info.appendChild(el("div", "ids", p.b));
    info.appendChild(el("div", "decision"));
    ["same", "different"].forEach(function (d) {
      var b = el("button", null, d + " (" + d[0] + ")");
      b.addEventListener("click", function (e) { e.stopPropagation(); move(i); mark(d); });
      info.appendChild(b);
    });
    r.appendChild(info);
    r.addEventListener("click", function () { move(i); });
    return r;
  }
  function paint(i) {
    var r = document.getElementById("pair-" + i);
    if (!r) return;
    var d = decision(i);
    r.classList.toggle("same", d === "same");
    r.classList.toggle("different", d === "different");
    r.classList.toggle("focus", i === focus);
    r.querySelector(".decision").textContent = d ? "marked " + d : "not reviewed";
  }
  function render() {
    shown = pageOf(focus);
    var start = shown * size, end = Math.min(pairs.length, start + size);
    main.textContent = "";
    if (!pairs.length) main.appendChild(el("p", null, "No pairs to review."));
    for (var i = start; i < end; i++) {
      if (i === above) main.appendChild(band());
      main.appendChild(row(i));
      paint(i);
    }
    if (pairs.length && end === above) main.appendChild(band());
    document.getElementById("page").textContent = "page " + (shown + 1) + " of " + pages;
  }
  function counts() {
    var same = 0, different = 0;
    for (var i = 0; i < pairs.length; i++) {
      if (decision(i) === "same") same++;
      else if (decision(i) === "different") different++;
    }
    document.getElementById("counts").textContent = (same + different) + " of " +
      pairs.length + " reviewed: " + same + " same, " + different + " different";
  }
  function move(i) {
    if (!pairs.length) return;
    var before = focus;
    focus = Math.max(0, Math.min(pairs.length - 1, i));
    if (pageOf(focus) !== shown) { render(); window.scrollTo(0, 0); }
    else { paint(before); paint(focus); }
    var r = document.getElementById("pair-" + focus);
    // Scrolled into view below the header, which stays at the top.
    var header = document.querySelector("header").offsetHeight;
    document.documentElement.style.scrollPaddingTop = (header + 8) + "px";
    if (r && r.scrollIntoView) r.scrollIntoView({block: "nearest"});
  }
  function mark(d) {
    if (!pairs.length) return;
    decisions[key(pairs[focus].a, pairs[focus].b)] = d;
    store();
    paint(focus);
    counts();
    if (d) move(focus + 1);
  }
  function field(value) {
    var s = String(value);
    return /[",\\r\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function csv() {
    var lines = ["image_a,image_b,similarity,decision"];
    for (var i = 0; i < pairs.length; i++) {
      var d = decision(i), p = pairs[i];
      if (d) lines.push([p.a, p.b, p.similarity, d].map(field).join(","));
    }
    return lines.join("\\n") + "\\n";
  }
  function save() {
    var text = csv(), url = URL.createObjectURL(new Blob([text], {type: "text/csv"}));
    var a = el("a");
    a.href = url;
    a.download = "review.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
    document.getElementById("saved").textContent = "saved " +
      (text.split("\\n").length - 2) + " decisions as review.csv";
  }
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var k = e.key;
    if (k === "s" || k === "y") mark("same");
    else if (k === "d" || k === "n") mark("different");
    else if (k === "u" || k === "Backspace" || k === "Delete") mark(null);
    else if (k === "ArrowDown" || k === "j") move(focus + 1);
    else if (k === "ArrowUp" || k === "k") move(focus - 1);
    else if (k === "ArrowRight" || k === "PageDown") move((pageOf(focus) + 1) * size);
    else if (k === "ArrowLeft" || k === "PageUp") move((pageOf(focus) - 1) * size);
    else if (k === "w") save();
    else return;
    e.preventDefault();
  });
  document.getElementById("save").addEventListener("click", save);
  document.getElementById("prev").addEventListener("click", function () {
    move((pageOf(focus) - 1) * size);
  });
  document.getElementById("next").addEventListener("click", function () {
    move((pageOf(focus) + 1) * size);
  });
  document.title = "Review: " + data.title;
  document.getElementById("title").textContent = "Near-duplicate review: " + data.title;
  document.getElementById("threshold").textContent = pairs.length + " pairs nearest the " +
    "threshold " + data.threshold.toFixed(3) + ": " + above + " above it (kept as " +
    "near-duplicates), " + (pairs.length - above) + " below (not kept). Is each pair the " +
    "same image?";
  document.getElementById("note").textContent = data.note;
  render();
  counts();
  window.review = {
    csv: csv,
    save: save,
    state: function () {
      return {
        focus: focus, page: shown, pages: pages, pairs: pairs.length, above: above,
        decisions: pairs.map(function (p, i) { return [p.a, p.b, decision(i)]; })
      };
    }
  };
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Review</title>
<style>/*STYLE*/</style>
</head>
<body>
<header>
<h1 id="title"></h1>
<p id="threshold"></p>
<p id="note"></p>
<p id="legend"><span><kbd>s</kbd> or <kbd>y</kbd> same</span><span><kbd>d</kbd> or <kbd>n</kbd>
different</span><span><kbd>u</kbd> clear</span><span><kbd>&darr;</kbd> <kbd>&uarr;</kbd> next,
previous pair</span><span><kbd>&rarr;</kbd> <kbd>&larr;</kbd> next, previous page</span>
<span><kbd>w</kbd> save review.csv</span></p>
<p><button id="save" type="button">Save review.csv</button> <span id="counts"></span>
<span id="saved"></span></p>
<p>Then: <code>python -m pipeline.dedup dedup.reviewed=&lt;the saved review.csv&gt;</code> scores
the threshold on your decisions and suggests one.</p>
</header>
<main id="pairs"></main>
<nav><button id="prev" type="button">&larr; previous page</button> <span id="page"></span>
<button id="next" type="button">next page &rarr;</button></nav>
<script type="application/json" id="review-data">/*DATA*/</script>
<script>/*SCRIPT*/</script>
</body>
</html>
"""
