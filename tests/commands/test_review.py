"""Dedup's review page: `review.html` holds the pairs nearest the threshold, self-contained
(thumbnails as data URIs, nothing fetched)."""

from __future__ import annotations

import base64
import json
import re
import shutil
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

from conftest import TINY_MODEL, composed, run_cli, write_image, write_layer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
