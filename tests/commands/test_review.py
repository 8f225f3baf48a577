"""Dedup's review page: `review.html` holds the pairs nearest the threshold, self-contained
(thumbnails as data URIs, nothing fetched); in a real headless Chromium, driven over the DevTools
protocol, a person's keys mark pairs, the marks survive a reload, the page saves them as
review.csv, and `dedup.reviewed` scores the threshold on them."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data

from pipeline import dedup
from pipeline.review import PAGE_SIZE
from pipeline.search.vectors import normalise

from browser import CHROMIUM, DevTools
from conftest import TINY_MODEL, composed, run_cli, write_image, write_layer


def page_data(path: Path) -> dict:
    """The pairs, thumbnails and settings review.html shows (the JSON its script reads)."""
    html = path.read_text()
    found = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', html)
    assert found, "review.html has no data"
    return json.loads(found.group(1))


class Links(HTMLParser):
    """Every src and href of the page's elements, and the elements that load files."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [f"{tag} {name}={value}" for name, value in attrs if name in ("src", "href")]
        self.found += [tag] if tag in ("link", "iframe", "object", "embed") else []


def assert_self_contained(path: Path) -> None:
    """Nothing the page shows or runs comes from elsewhere: no URL at all, no linked file."""
    html = path.read_text()
    assert "http://" not in html and "https://" not in html
    links = Links()
    links.feed(html)
    assert links.found == [] and "@import" not in html and "url(" not in html


def planted(tmp_path: Path, n: int = 8) -> tuple[Path, Path, list[str]]:
    """n real photos on disk and their made-up embeddings, two of them near-duplicates."""
    root, names = tmp_path / "images", ["chelsea", "astronaut", "coffee", "rocket", "camera"]
    ids = []
    for i in range(n):
        image = getattr(skimage.data, names[i % len(names)])()
        image = cv2.resize(image, (300 + 10 * i, 200))  # larger than a thumbnail
        ids.append(f"sub dir/{i}.png")  # a space: ids are paths, never URLs
        write_image(root / ids[-1], image)
    vectors = np.random.default_rng(3).standard_normal((n, 16)).astype(np.float32)
    vectors[1] = vectors[0] + 0.05
    return write_layer(tmp_path / "l.parquet", normalise(vectors), ids, None), root, ids


def test_the_page_shows_the_pairs_nearest_the_threshold_as_thumbnails(tmp_path: Path) -> None:
    layer, root, ids = planted(tmp_path)
    out = tmp_path / "out"
    cfg = composed(
        "tracking=none",
        f"embeddings={layer}",
        f"dedup.output_dir={out}",
        f"images_root={root}",
        "dedup.threshold=0.2",
        "dedup.whiten=false",
        "dedup.review_pairs=10",
    )
    result = dedup.run(cfg)
    assert out / "review.html" in result.artifacts
    assert_self_contained(out / "review.html")
    data = page_data(out / "review.html")
    pairs = pd.read_parquet(out / "pairs.parquet")
    # 8 images, k=10: all 28 pairs are candidates; 5 of those at or above the threshold (or all
    # there are, fewer than 5) and the strongest below it fill the 10.
    above = min(5, len(pairs))
    assert len(data["pairs"]) == 10 and sum(p["above"] for p in data["pairs"]) == above
    similarity = [p["similarity"] for p in data["pairs"]]
    assert similarity == sorted(similarity, reverse=True)
    assert data["threshold"] == 0.2 and data["page_size"] == PAGE_SIZE
    shown = {i for p in data["pairs"] for i in (p["a"], p["b"])}
    assert set(data["thumbs"]) == shown and shown <= set(ids)
    for uri in data["thumbs"].values():  # small JPEGs, never the originals
        assert uri.startswith("data:image/jpeg;base64,")
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",")[1]), np.uint8), 1)
        assert max(picture.shape[:2]) == 160
    assert not data["note"] and not data["decided"]


def test_without_the_images_the_page_shows_their_ids(tmp_path: Path) -> None:
    layer, _, _ = planted(tmp_path, n=4)
    out = tmp_path / "out"
    cfg = composed(
        "tracking=none",
        f"embeddings={layer}",
        f"dedup.output_dir={out}",
        f"images_root={tmp_path / 'elsewhere'}",
        "dedup.threshold=0.5",
        "dedup.whiten=false",
    )
    dedup.run(cfg)
    data = page_data(out / "review.html")
    assert len(data["pairs"]) == 6 and data["thumbs"] == {}  # 4 images: 6 pairs, all shown
    assert "no images_root holds the images" in data["note"]
    assert "data:image" not in (out / "review.html").read_text()


# --- through the user's door: an extraction, then dedup --------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    """The photos and altered copies of three of them (9 images: 36 pairs, two pages of the
    review), extracted by the tiny model: the layer's embeddings."""
    work = tmp_path_factory.mktemp("review")
    folder = work / "images"
    shutil.copytree(photos, folder)
    for label, name in [("animals", "chelsea"), ("animals", "coffee"), ("scenes", "rocket")]:
        rgb = cv2.imread(str(folder / label / f"{name}.png"), cv2.IMREAD_COLOR_RGB)
        copy = np.ascontiguousarray(cv2.flip(rgb[4:-4, 6:], 1))  # cropped and mirrored
        write_image(folder / label / f"{name}_copy.png", copy)
    done = run_cli(
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={folder}",
        "dataset.name=review",
        "layers=[global_pool]",
        "calibration.images=4",
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    return work / "outputs/embeddings/review/test_efficientnet-random/global_pool.parquet"


def review_dir(cwd: Path) -> Path:
    return cwd / "outputs/dedup/review/test_efficientnet-random/global_pool"


@pytest.mark.slow
def test_cli_writes_a_self_contained_review_page(tmp_path: Path, extracted: Path) -> None:
    done = run_cli(
        f"embeddings={extracted}",
        "tracking=none",
        "dedup.review_pairs=10",
        module="pipeline.dedup",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    page = review_dir(tmp_path) / "review.html"
    assert_self_contained(page)
    data = page_data(page)
    kept = len(pd.read_parquet(page.parent / "pairs.parquet"))  # of the 36 pairs
    above = min(5, kept)
    assert len(data["pairs"]) == above + min(10 - above, 36 - kept)
    assert sum(p["above"] for p in data["pairs"]) == above
    assert len(data["thumbs"]) == len({i for p in data["pairs"] for i in (p["a"], p["b"])})
    assert page.read_text().count("data:image/jpeg;base64,") == len(data["thumbs"])


# --- in a real browser --------------------------------------------------------------------------


def expected_scores(csv: pd.DataFrame, threshold: float) -> tuple[float, float]:
    """Precision and recall at `threshold` over the reviewed pairs, worked out the plain way."""
    kept = csv["similarity"] >= threshold
    same = csv["decision"] == "same"
    precision = (kept & same).sum() / kept.sum() if kept.any() else 1.0
    return precision, (kept & same).sum() / same.sum()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's)")
def test_a_person_marks_pairs_in_chromium_and_dedup_scores_the_threshold_on_them(
    tmp_path: Path, extracted: Path
) -> None:
    args = [f"embeddings={extracted}", "tracking=none"]
    done = run_cli(*args, module="pipeline.dedup", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = review_dir(tmp_path) / "review.html"
    assert len(page_data(page)["pairs"]) == 36  # all of them: two pages

    downloads = tmp_path / "downloads"
    browser = DevTools(tmp_path / "profile", downloads)
    loaded = "typeof review === 'object'"  # the page's script has run
    try:
        browser.open(page.as_uri(), loaded)
        # s: the first pair same, on to the second; d: different; down past the third; y: the
        # fourth same, on to the fifth; up twice to the third; n: different, on to the fourth.
        browser.press("s", "d", "ArrowDown", "y", "ArrowUp", "ArrowUp", "n")
        browser.wait_for("review.state().decisions[2][2] === 'different'")  # the last key's
        state = browser.evaluate("review.state()")
        marks = [d for _, _, d in state["decisions"]]
        assert marks[:4] == ["same", "different", "different", "same"]
        assert marks[4:] == [None] * 32 and state["focus"] == 3 and state["page"] == 0
        browser.screenshot(tmp_path / "review.png")
        # Right: the next page (the second of two), its first pair in focus; left: back.
        browser.press("ArrowRight")
        browser.wait_for(f"review.state().focus === {PAGE_SIZE}")
        assert browser.evaluate("review.state().page") == 1
        assert browser.evaluate("document.querySelector('.pair.focus').id") == f"pair-{PAGE_SIZE}"
        browser.press("ArrowLeft", "u")  # the first pair of page 1 cleared, then marked again
        browser.wait_for("review.state().decisions[0][2] === null")
        assert browser.evaluate("review.state().focus") == 0
        browser.press("s")
        browser.wait_for("review.state().decisions[0][2] === 'same'")  # before navigating
        # The marks survive a reload (localStorage). Chromium commits a page's localStorage
        # writes a moment later, so a reload at once may find the last one not yet there: the
        # page is reloaded until it has them all, for up to 10 s.
        deadline = time.monotonic() + 10
        while True:
            browser.open(page.as_uri(), loaded)
            reloaded = browser.evaluate("review.state()")["decisions"]
            if reloaded == state["decisions"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert reloaded == state["decisions"]
        # w saves review.csv as a download: the text the page makes.
        made = browser.evaluate("review.csv()")
        browser.press("w")
        saved = downloads / "review.csv"
        deadline = time.monotonic() + 30
        while not (saved.is_file() and saved.read_text() == made):
            assert time.monotonic() < deadline, f"no download: {os.listdir(downloads)}"
            time.sleep(0.1)
    finally:
        browser.close()

    # A picture of the page with thumbnails, the focus and the marks: not blank.
    shot = cv2.imread(str(tmp_path / "review.png"))
    assert shot.shape == (900, 1200, 3) and shot.std() > 20
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000
    csv = pd.read_csv(saved)
    assert list(csv.columns) == ["image_a", "image_b", "similarity", "decision"]
    assert csv["decision"].tolist() == ["same", "different", "different", "same"]
    shown = page_data(page)["pairs"][:4]
    assert list(zip(csv["image_a"], csv["image_b"], strict=True)) == [
        (p["a"], p["b"]) for p in shown
    ]

    again = run_cli(*args, f"dedup.reviewed={saved}", module="pipeline.dedup", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    metrics = json.loads((review_dir(tmp_path) / "metrics.json").read_text())
    precision, recall = expected_scores(csv, metrics["threshold"])
    assert metrics["reviewed_pairs"] == 4 and metrics["reviewed_same"] == 2
    assert metrics["reviewed_precision"] == pytest.approx(precision)
    assert metrics["reviewed_recall"] == pytest.approx(recall)
    # Precision from the top: 1/1, 1/2, 1/3, 2/4: at 0.95 only the first pair is kept, so the
    # suggested threshold lies between the second's similarity and the first's.
    s = csv["similarity"]
    assert metrics["reviewed_threshold_reached"]
    assert s[1] - 1e-5 < metrics["reviewed_threshold"] <= s[0] + 1e-5
    assert metrics["reviewed_threshold_precision"] == 1.0
    assert metrics["reviewed_threshold_recall"] == 0.5
    said = again.stdout + again.stderr
    assert f"dedup.threshold={metrics['reviewed_threshold']} keeps precision >= 0.95" in said
    assert f"recall {recall:.3f} on 4 pairs)" in said  # the summary line
    # The page made again shows the reviewed pairs marked.
    assert len(page_data(page)["decided"]) == 4
