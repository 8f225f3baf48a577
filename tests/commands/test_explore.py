"""The embedding explorer, `python -m pipeline.explore`: its table (a row per image with its
place on the map, thumbnail, cluster, near-duplicate group and nearest neighbours), what it keeps
for the next run, its refusals, and, in a real headless Chromium, Embedding Atlas showing the
points with a thumbnail in the tooltip: served by the command, and exported as a static site
opened from a plain static file server with every other host unreachable."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import explore, projection
from pipeline.config import Projection
from pipeline.errors import ConfigError
from pipeline.search.vectors import normalise

from browser import CHROMIUM, OFFLINE, DevTools
from conftest import TINY_MODEL, composed, run_cli, write_image, write_layer

needs_atlas = pytest.mark.skipif(
    importlib.util.find_spec("embedding_atlas") is None,
    reason="needs the explore extra (embedding-atlas)",
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's)"
)
# WebGL in software (SwiftShader): Embedding Atlas draws its points with WebGPU where there is
# one, else with WebGL 2, which headless Chromium has only this way.
WEBGL = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")


def planted(tmp_path: Path, n: int = 12) -> tuple[Path, Path, list[str], np.ndarray]:
    """A layer of n images in two labelled folders (photos of random colours), its images'
    folder recorded as the dataset's root, and its normalised vectors."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    ids = [f"{'ab'[i % 2]}/{i:02d}.jpg" for i in range(n)]
    for i, image_id in enumerate(ids):
        write_image(root / image_id, rng.integers(0, 255, (60 + i, 80, 3), np.uint8))
    vectors = normalise(rng.standard_normal((n, 16)).astype(np.float32))
    labels = ["ab"[i % 2] for i in range(n)]
    layer = write_layer(tmp_path / "l.parquet", vectors, ids, labels, dataset={"root": str(root)})
    return layer, root, ids, vectors


def settings(tmp_path: Path, layer: Path, *overrides: str) -> explore.PipelineConfig:
    return composed(
        "tracking=none",
        f"embeddings={layer}",
        f"explore.output_dir={tmp_path / 'explore'}",
        f"explore.cluster_dir={tmp_path / 'cluster'}",
        f"explore.dedup_dir={tmp_path / 'dedup'}",
        "explore.projection=pca",
        *overrides,
    )


def table_of(cfg: explore.PipelineConfig) -> pd.DataFrame:
    """The table the command would show, made as its run makes it."""
    from pipeline.storage.contract import embeddings_input, images_root
    from pipeline.storage.inputs import read_layer

    params, out = cfg.explore, Path(cfg.explore.output_dir)
    embeddings = read_layer(Path(cfg.embeddings))
    digest = embeddings_input(Path(cfg.embeddings), embeddings.metadata).digest
    layout = projection.cached_layout(out / explore.LAYOUT_FILE, embeddings, digest, params)
    root = images_root(cfg.images_root, embeddings.metadata)
    thumbs = explore.cached_thumbnails(out / explore.THUMBNAILS_FILE, embeddings.ids, root, 48)
    clusters = explore.joined(
        Path(params.cluster_dir) / "assignments.parquet", "cluster", embeddings
    )
    groups = explore.joined(Path(params.dedup_dir) / "groups.parquet", "group", embeddings)
    table = explore.explore_table(embeddings, layout, thumbs, clusters, groups, params.neighbours)
    return table.to_pandas()


def test_the_table_has_each_image_with_its_place_thumbnail_cluster_group_and_neighbours(
    tmp_path: Path,
) -> None:
    layer, _, ids, vectors = planted(tmp_path)
    (tmp_path / "cluster").mkdir()
    pd.DataFrame({"image_id": ids[::-1], "cluster": np.arange(12)[::-1] % 3}).to_parquet(
        tmp_path / "cluster/assignments.parquet"
    )
    (tmp_path / "dedup").mkdir()
    pd.DataFrame({"image_id": [ids[4], ids[7]], "group": [0, 0]}).to_parquet(
        tmp_path / "dedup/groups.parquet"
    )
    table = table_of(settings(tmp_path, layer, "explore.neighbours=3"))
    assert table["image_id"].tolist() == ids and table["label"].tolist() == ["a", "b"] * 6
    assert table[explore.ROW].tolist() == list(range(12))
    assert table["cluster"].tolist() == [i % 3 for i in range(12)]  # joined by id, not by row
    groups = table["duplicate_group"]
    assert groups.isna().sum() == 10 and groups[4] == groups[7] == 0
    # The map: the first two principal components of the normalised rows.
    from sklearn.decomposition import PCA

    expected = PCA(2).fit_transform(vectors)
    for axis, column in enumerate(["x", "y"]):
        correlation = np.corrcoef(expected[:, axis], table[column].to_numpy(float))[0, 1]
        assert abs(correlation) > 0.999
    # Neighbours: each row's 3 most similar others by cosine, as rows and cosine distances.
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    for row, found in enumerate(table[explore.NEIGHBOURS]):
        nearest = np.argsort(-similarity[row], kind="stable")[:3]
        assert list(found["ids"]) == nearest.tolist()
        np.testing.assert_allclose(found["distances"], 1 - similarity[row, nearest], atol=1e-5)
    # Thumbnails: small JPEGs of the files (48 pixels their longer side), never the originals.
    for image_id, thumbnail in zip(ids, table["thumbnail"], strict=True):
        assert thumbnail["path"] == image_id
        picture = cv2.imdecode(np.frombuffer(thumbnail["bytes"], np.uint8), cv2.IMREAD_COLOR)
        assert thumbnail["bytes"][:3] == b"\xff\xd8\xff" and max(picture.shape[:2]) == 48


def test_the_map_neighbours_and_thumbnails_are_kept_and_made_again_only_for_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer, root, ids, _ = planted(tmp_path)
    cfg = settings(tmp_path, layer)
    first = table_of(cfg)
    layout_file = tmp_path / "explore" / explore.LAYOUT_FILE
    assert layout_file.is_file() and (tmp_path / "explore" / explore.THUMBNAILS_FILE).is_file()
    # A second run computes nothing: the same table from the files kept.
    made: list[Path] = []
    monkeypatch.setattr(projection, "nearest_neighbours", lambda *a: pytest.fail("searched again"))
    monkeypatch.setattr(explore, "make_thumbnails", lambda paths, *a: made.extend(paths) or [])
    again = table_of(cfg)
    assert made == []
    pd.testing.assert_frame_equal(first, again)
    # A file changed: its thumbnail alone is made again; one gone: no thumbnail, said once.
    write_image(root / ids[3], np.zeros((100, 100, 3), np.uint8))
    (root / ids[5]).unlink()
    monkeypatch.undo()
    changed = table_of(cfg)
    assert changed["thumbnail"][5] is None or pd.isna(changed["thumbnail"][5])
    picture = cv2.imdecode(np.frombuffer(changed["thumbnail"][3]["bytes"], np.uint8), 1)
    assert picture.shape[:2] == (48, 48) and picture.max() < 10
    assert changed["thumbnail"][0] == first["thumbnail"][0]
    # Other settings, or another layer: the layout is made again.
    monkeypatch.setattr(projection, "nearest_neighbours", lambda *a: pytest.fail("searched"))
    with pytest.raises(pytest.fail.Exception, match="searched"):
        table_of(settings(tmp_path, layer, "explore.neighbours=4"))


def test_auto_is_umap_where_it_is_installed_and_the_set_is_large_enough() -> None:
    installed = importlib.util.find_spec("umap") is not None
    assert projection.projection_method(Projection.auto, 49, 50) == "pca"
    assert projection.projection_method(Projection.auto, 50, 50) == ("umap" if installed else "pca")
    assert projection.projection_method(Projection.pca, 10**6, 50) == "pca"


@pytest.mark.slow  # umap-learn's numba functions compile on first use: about 20 s
@pytest.mark.skipif(importlib.util.find_spec("umap") is None, reason="needs umap-learn")
def test_the_umap_map_keeps_groups_of_neighbours_apart() -> None:
    """UMAP on the neighbours our search found (umap-learn searches none itself): three groups
    of 20 rows, each group's points together on the map and apart from the others'."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 32))
    noise = 0.3 * rng.standard_normal((60, 32))
    unit = normalise((np.repeat(centres, 20, axis=0) + noise).astype(np.float32))
    rows, similarity = projection.nearest_neighbours(unit, projection.UMAP_NEIGHBOURS - 1, seed=0)
    xy = projection.umap_map(unit, rows, similarity, seed=0)
    assert xy.shape == (60, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    group = np.repeat(np.arange(3), 20)
    middles = np.stack([xy[group == g].mean(axis=0) for g in range(3)])
    nearest = np.linalg.norm(xy[:, None] - middles[None], axis=2).argmin(axis=1)
    assert (nearest == group).all()
    np.testing.assert_array_equal(xy, projection.umap_map(unit, rows, similarity, seed=0))


def test_an_export_replaces_only_a_folder_an_export_wrote(tmp_path: Path) -> None:
    explore.check_export_folder(tmp_path / "new")  # none yet: fine
    (tmp_path / "site/data").mkdir(parents=True)
    (tmp_path / "site/data/metadata.json").write_text("{}")
    explore.check_export_folder(tmp_path / "site")  # an earlier export: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        explore.check_export_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match="is a file"):
        explore.check_export_folder(tmp_path / "mine/notes.txt")


def test_without_embedding_atlas_the_command_says_how_to_install_it(tmp_path: Path) -> None:
    layer, *_ = planted(tmp_path, n=4)
    # The package made unfindable in that process, as it is where the extra is not installed.
    code = (
        "import sys; sys.modules['embedding_atlas'] = None; from pipeline.cli import explore; "
        "explore()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, f"embeddings={layer}", "tracking=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "error: the explorer needs embedding-atlas, which is not installed: "
        "pip install 'pipeline[explore]'"
    )


# --- through the user's door, in a real browser ------------------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    """The photos and altered copies of three of them (9 images), extracted by the tiny model,
    with a cluster per label and the copies' near-duplicate groups where the cluster and dedup
    stages write them: the folder the commands run in."""
    work = tmp_path_factory.mktemp("explore")
    folder = work / "images"
    shutil.copytree(photos, folder)
    for label, name in [("animals", "chelsea"), ("animals", "coffee"), ("scenes", "rocket")]:
        rgb = cv2.imread(str(folder / label / f"{name}.png"), cv2.IMREAD_COLOR_RGB)
        write_image(folder / label / f"{name}_copy.png", np.ascontiguousarray(rgb[4:-4, 6:]))
    done = run_cli(*EXTRACTED, "calibration.images=0", cwd=work)
    assert done.returncode == 0, done.stderr
    ids = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    stage = "review/test_efficientnet-random/global_pool"
    (work / "outputs/cluster" / stage).mkdir(parents=True)
    clusters = [int(i.startswith("scenes")) for i in ids]
    pd.DataFrame({"image_id": ids, "cluster": clusters}).to_parquet(
        work / "outputs/cluster" / stage / "assignments.parquet"
    )
    (work / "outputs/dedup" / stage).mkdir(parents=True)
    copies = [i for i in ids if "_copy" in i] + [
        i.replace("_copy", "") for i in ids if "_copy" in i
    ]
    pd.DataFrame({"image_id": copies, "group": [0, 1, 2, 0, 1, 2]}).to_parquet(
        work / "outputs/dedup" / stage / "groups.parquet"
    )
    return work


EXTRACTED = [*TINY_MODEL, "dataset=folder", "dataset.root=images", "dataset.name=review"]
EXPLORE = [*EXTRACTED, "layer=global_pool", "explore.projection=pca"]
IMAGES = 9


def map_box(browser: DevTools) -> tuple[int, int, int, int]:
    """Where the map is drawn: the largest canvas (x, y, width, height), as laid out now."""
    box = browser.evaluate(
        "(() => { const r = [...document.querySelectorAll('canvas')].map(c => "
        "c.getBoundingClientRect()).sort((a, b) => b.width * b.height - a.width * a.height)[0];"
        " return r ? [r.x, r.y, r.width, r.height] : [0, 0, 0, 0]; })()"
    )
    x, y, width, height = (round(v) for v in box)
    return x, y, width, height


def drawn_points(browser: DevTools, shot: Path) -> list:
    """The points drawn on the map, in the page's pixels: the centres of blobs of saturated
    pixels in a screenshot of it (left of its legend, below its colour menu)."""
    x, y, width, height = map_box(browser)
    browser.screenshot(shot)
    if width < 300 or height < 200:
        return []  # not laid out yet
    picture = cv2.imread(str(shot))[y + 40 : y + height - 30, x : x + width - 220]
    colour = picture.max(axis=2).astype(int) - picture.min(axis=2) > 50
    count, _, stats, centres = cv2.connectedComponentsWithStats(colour.astype(np.uint8))
    blobs = range(1, count)  # 0: the background
    return [(x + centres[i][0], y + 40 + centres[i][1]) for i in blobs if stats[i][4] >= 20]


def show_points_and_a_tooltip(browser: DevTools, url: str, shot: Path) -> dict:
    """Open the explorer at `url`, wait for its points, hover one until its tooltip shows a
    thumbnail, and take a screenshot: what the page says and shows."""
    browser.page("Network.enable")
    browser.open(url, "/\\d+ points/.test(document.body.innerText)", seconds=60)
    deadline = time.monotonic() + 30
    while not (points := drawn_points(browser, shot)):
        assert time.monotonic() < deadline, "no points drawn"  # the page draws after it loads
        time.sleep(0.2)
    _, y, _, height = map_box(browser)
    tooltip = (  # a thumbnail over the map (the table's are below it)
        "[...document.querySelectorAll('img')].filter(i => i.src.startsWith('data:image/jpeg')"
        f" && i.naturalWidth > 0 && i.getBoundingClientRect().y < {y + height}).length > 0"
    )
    for cx, cy in points:
        for step in range(6):  # arrive at it as a mouse does, from the left
            browser.move_mouse(cx - 25 + 5 * step, cy)
            time.sleep(0.05)
        try:
            browser.wait_for(tooltip, seconds=5)
            break
        except AssertionError:
            continue
    assert browser.evaluate(tooltip), f"none of {len(points)} points showed a thumbnail"
    time.sleep(0.5)  # the tooltip's picture drawn
    browser.screenshot(shot)
    requests = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e["method"] == "Network.requestWillBeSent"
    ]
    text = browser.evaluate("document.body.innerText")
    return {"text": text, "requests": requests, "drawn": len(points)}


def assert_shows_points_and_a_thumbnail(shot: Path, seen: dict, origin: str) -> None:
    text = seen["text"]
    assert f"{IMAGES} / {IMAGES} points" in text and f"{IMAGES} points" in text
    assert 2 <= seen["drawn"] <= IMAGES  # two labels' colours at least; copies may overlap
    picture = cv2.imread(str(shot))
    assert picture.shape == (900, 1400, 3) and picture.std() > 20  # not blank
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 1000  # photos, not flat colours
    elsewhere = [u for u in seen["requests"] if not u.startswith((origin, "data:", "blob:"))]
    assert not elsewhere, elsewhere  # nothing from the network


@needs_atlas
@needs_chromium
@pytest.mark.slow
def test_cli_serves_the_explorer_and_chromium_shows_points_with_thumbnails(
    extracted: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    said, errors = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with said.open("w") as out, errors.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline.explore", *EXPLORE, "explore.port=0"],
            cwd=extracted,
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:
            assert server.poll() is None and time.monotonic() < deadline, errors.read_text()
            found = re.search(r"Embedding Atlas at (http://127\.0\.0\.1:\d+/)", said.read_text())
            url = found.group(1) if found else time.sleep(0.1)
        browser = DevTools(tmp_path / "profile", size=(1400, 900), flags=(*WEBGL, OFFLINE))
        try:
            seen = show_points_and_a_tooltip(browser, url, tmp_path / "explore_served.png")
        finally:
            browser.close()
        assert_shows_points_and_a_thumbnail(tmp_path / "explore_served.png", seen, url)
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        server.wait(60)
    assert server.returncode == 0, errors.read_text()
    assert errors.read_text().strip().splitlines()[-1] == "stopped"
    kept = extracted / "outputs/explore/review/test_efficientnet-random/global_pool"
    assert pq.read_table(kept / explore.LAYOUT_FILE).num_rows == IMAGES  # kept for a rerun


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@needs_atlas
@needs_chromium
@pytest.mark.slow
def test_cli_exports_a_static_site_that_chromium_opens_offline(
    extracted: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = run_cli(
        *EXPLORE, f"explore.export={site}", module="pipeline.explore", cwd=extracted, env=env
    )
    assert done.returncode == 0, done.stderr
    assert f"-> {site} (a static site" in done.stdout + done.stderr
    table = pq.read_table(site / "data/dataset.parquet").to_pandas()
    assert len(table) == IMAGES and table["duplicate_group"].notna().sum() == 6
    assert {"image_id", "label", "thumbnail", "x", "y", "cluster"} <= set(table.columns)
    # Any static file server will do: the standard library's, on a free port.
    handler = functools.partial(QuietHandler, directory=str(site))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/"
    browser = DevTools(tmp_path / "profile", size=(1400, 900), flags=(*WEBGL, OFFLINE))
    try:
        seen = show_points_and_a_tooltip(browser, url, tmp_path / "explore_exported.png")
    finally:
        browser.close()
        files.shutdown()
    assert_shows_points_and_a_thumbnail(tmp_path / "explore_exported.png", seen, url)
