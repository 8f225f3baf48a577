"""How alike the layers are: the report's linear CKA against its definition, its invariances,
the images it compares (joined by id, a seeded sample), and cka.csv / cka.png through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import report_cka
from pipeline.errors import ConfigError
from pipeline.report_cka import cka_table, linear_cka, shared_sample

from conftest import N_PHOTOS, TINY_MODEL, composed, run_cli, write_layer


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. 2012, as written there: K and L with their diagonals set to 0,
    (tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1) / (n(n-3)); n x n matrices."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))  # noqa: E741
    ones = np.ones(n)
    return (
        np.trace(k @ l)
        + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * ones @ k @ l @ ones
    ) / (n * (n - 3))


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The definition, on the features as they are (not centred: the estimator does not change
    when a layer is shifted): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, L = Y Y^T."""
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return unbiased_hsic(k, l) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(l, l))


def related(n: int, d1: int, d2: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two feature matrices of n images that share a few directions, plus noise, off-centre."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 3))
    x = shared @ rng.normal(size=(3, d1)) + rng.normal(size=(n, d1)) + 5
    y = shared @ rng.normal(size=(3, d2)) + 0.5 * rng.normal(size=(n, d2)) - 2
    return x, y


@pytest.mark.parametrize(
    ("n", "d1", "d2"),
    [(80, 6, 12), (80, 12, 6), (20, 50, 70), (30, 5, 70), (30, 70, 5), (40, 40, 39)],
    ids=["narrow", "narrow-swapped", "wide", "narrow-wide", "wide-narrow", "d=n"],
)
def test_cka_is_the_hsic_definition_in_either_form(
    n: int, d1: int, d2: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_cka, "GRAM_BLOCK", 16)  # a wide layer's Gram summed over blocks
    x, y = related(n, d1, d2)
    expected = hsic_cka(x, y)
    assert 0.05 < expected < 0.95  # neither trivially 0 nor 1
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(y, x) == pytest.approx(expected, rel=1e-10)
    # As a layer is read (float32), computed in float64: the float32 rounding only.
    as_read = linear_cka(x.astype(np.float32), y.astype(np.float32))
    assert as_read == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("n", "d"), [(100, 8), (20, 60)], ids=["d<n", "d>n"])
def test_cka_is_one_for_a_layer_and_its_rotations_and_scalings(n: int, d: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d)) @ np.diag(np.linspace(0.1, 3, d))  # not isotropic
    y = rng.normal(size=(n, 5)) + x[:, :5]
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # an orthogonal d x d matrix
    assert linear_cka(x, x) == pytest.approx(1, abs=1e-12)
    assert linear_cka(x, 7.5 * x @ q + 3) == pytest.approx(1, abs=1e-12)
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(0.3 * x @ q, 20 * y) == pytest.approx(base, abs=1e-12)


def test_cka_changes_under_a_linear_map_that_is_not_a_rotation() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 10))
    stretch = np.diag([1, 1, 1, 1, 1, 1, 1, 1, 1, 30.0])  # invertible, not orthogonal
    assert linear_cka(x, x @ stretch) < 0.5
    mixed = x @ rng.normal(size=(10, 10))
    assert abs(linear_cka(x, mixed) - 1) > 0.05


def test_cka_of_independent_features_is_about_zero_however_wide() -> None:
    """The biased estimator of Kornblith et al. gives unrelated features of d values about
    d / (d + n): 0.91 for 1000 values on 100 images. The debiased one gives about 0."""
    rng = np.random.default_rng(3)
    assert abs(linear_cka(rng.normal(size=(2000, 10)), rng.normal(size=(2000, 20)))) < 0.01
    for _ in range(5):
        assert abs(linear_cka(rng.normal(size=(100, 1000)), rng.normal(size=(100, 1000)))) < 0.03
    narrow_and_wide = linear_cka(rng.normal(size=(100, 5)), rng.normal(size=(100, 1000)))
    assert abs(narrow_and_wide) < 0.05
    # A shared signal under wide noise still shows.
    shared = rng.normal(size=(100, 3))
    x = np.hstack([shared * 20, rng.normal(size=(100, 1000))])
    y = np.hstack([shared * 20, rng.normal(size=(100, 1000))])
    assert linear_cka(x, y) > 0.4


def test_a_constant_layer_or_under_four_images_has_no_cka() -> None:
    x = np.random.default_rng(4).normal(size=(30, 4))
    assert np.isnan(linear_cka(x, np.ones((30, 3))))
    assert np.isnan(linear_cka(x[:3], x[:3, ::-1]))  # the unbiased HSIC divides by n - 3
    assert linear_cka(x[:4], x[:4, ::-1]) == pytest.approx(1)


def test_layers_are_joined_by_image_id_on_a_seeded_sample_of_those_they_share(
    tmp_path: Path,
) -> None:
    """Layers in different row orders, one without some images, another model's layer beside:
    each pair is compared on the same images, so a rotated copy in another order scores 1."""
    rng = np.random.default_rng(5)
    n = 300
    ids = [f"{i:04d}.jpg" for i in range(n)]
    x = rng.normal(size=(n, 6)) @ np.diag(np.linspace(1, 4, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    own = tmp_path / "outputs/embeddings/set/model-a"
    order = rng.permutation(n)
    layers = {"first": x, "rotated": 2 * x @ q, "noise": rng.normal(size=(n, 6))}
    rows = {"first": np.arange(n), "rotated": order, "noise": order[: n - 40]}
    for (name, vectors), depth in zip(layers.items(), (1, 2, 3), strict=True):
        write_layer(
            own / f"{name}.parquet",
            vectors[rows[name]],
            [ids[i] for i in rows[name]],
            None,
            depth=depth,
        )
    other = tmp_path / "outputs/embeddings/set/model-b"
    write_layer(other / "logits.parquet", x[order][:, :3], [ids[i] for i in order], None)
    # A model of other images under the same dataset name: left out, not a reason to fail.
    write_layer(tmp_path / "outputs/embeddings/set/model-c/x.parquet", x, ["other"] * n, None)
    # A folder beside that holds a Parquet folder no extraction wrote: left out, with a warning.
    junk = tmp_path / "outputs/embeddings/set/junk/t.parquet"
    junk.mkdir(parents=True)
    pq.write_table(pa.table({"a": [1, 2]}), junk / "part-0.parquet")
    # And one whose metadata reads but whose rows do not (a part cut short).
    cut = write_layer(tmp_path / "outputs/embeddings/set/cut/x.parquet", x, ids, None)
    (cut / "part-999999.parquet").write_bytes(b"PAR1 cut short")
    # And one whose ids are numbers (some other table of the same shape).
    numbers = tmp_path / "outputs/embeddings/set/numbers/x.parquet"
    write_layer(numbers, x, ids, None)
    for part in numbers.glob("part-*.parquet"):
        table = pq.read_table(part)
        table = table.set_column(0, "image_id", pa.array(range(len(table)), pa.int64()))
        pq.write_table(table, part)
    overrides = [f"output_dir={own}", "report.cka_sample=100", "report.cka_seed=1"]
    cfg = composed(*overrides)
    table = cka_table(cfg).set_index(["model_a", "layer_a", "model_b", "layer_b"])["cka"]
    assert table.loc[("model-a", "first", "model-a", "rotated")] == pytest.approx(1, abs=1e-6)
    assert table.loc[("model-a", "first", "model-a", "noise")] < 0.2
    # x's first three values, its least variable: the other model sees a part of the layer.
    assert 0.1 < table.loc[("model-b", "logits", "model-a", "first")] < 0.5
    full = cka_table(cfg)
    assert full["n"].eq(100).all() and len(full) == 16
    assert not {"model-c", "junk", "cut", "numbers"} & set(full["model_a"])
    assert list(dict.fromkeys(full["layer_a"])) == ["first", "rotated", "noise", "logits"]
    # The draw is from the images all layers have (not the 40 `noise` lacks), by the seed.
    files = [("model-a", f.stem, f) for f in (own / "first.parquet", own / "noise.parquet")]
    _, drawn, where = shared_sample(files, 100, seed=1)
    assert drawn == shared_sample(files[::-1], 100, seed=1)[1]
    assert drawn != shared_sample(files, 100, seed=2)[1]
    assert set(drawn) <= {ids[i] for i in order[: n - 40]} and len(set(drawn)) == 100
    assert [ids[i] for i in where[0]] == drawn
    # This model's layers only.
    alone = cka_table(composed(*overrides, "report.cka_models=[]"))
    assert set(alone["model_b"]) == {"model-a"} and len(alone) == 9


def test_layers_that_share_no_images_are_refused(tmp_path: Path) -> None:
    vectors = np.random.default_rng(6).normal(size=(4, 3))
    a = write_layer(tmp_path / "a.parquet", vectors, ["1", "2", "3", "4"], None)
    b = write_layer(tmp_path / "b.parquet", vectors, ["4", "5", "6", "7"], None)
    with pytest.raises(ConfigError, match="of m share 1 image ids: CKA needs 4 or more"):
        shared_sample([("m", "a", a), ("m", "b", b)], 100, seed=0)


@pytest.mark.slow
def test_report_writes_the_cka_of_every_pair_of_layers_and_models(
    tmp_path: Path, photos: Path
) -> None:
    same = [*TINY_MODEL, "dataset=folder", f"dataset.root={photos}", "dataset.name=photos"]
    layers = ["blocks.0", "blocks.2", "global_pool"]
    for model in ("test_efficientnet", "test_resnet"):
        chosen = [f"layers=[{','.join(layers)}]"] if model == "test_efficientnet" else []
        done = run_cli(*same, f"model.name={model}", *chosen, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    done = run_cli(*same, module="pipeline.report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/report/photos/test_efficientnet-random"
    table = pd.read_csv(out / "cka.csv")
    assert list(table.columns) == ["model_a", "layer_a", "model_b", "layer_b", "cka", "n"]
    ours = table[(table["model_a"] == table["model_b"]) & table["model_a"].str.startswith("test_e")]
    assert list(dict.fromkeys(ours["layer_a"])) == layers  # model order
    names = list(dict.fromkeys(zip(table["model_a"], table["layer_a"], strict=True)))
    assert names[:3] == [("test_efficientnet-random", layer) for layer in layers]
    assert names[3:] == [("test_resnet-random", "global_pool")]  # its default layer
    assert len(table) == 16 and (table["n"] == N_PHOTOS).all()  # every pair, both orders
    cka = table.set_index(["model_a", "layer_a", "model_b", "layer_b"])["cka"]
    for (a, b, c, d), value in cka.items():
        assert value == pytest.approx(cka.loc[(c, d, a, b)])
        assert (value == 1) if (a, b) == (c, d) else (0 < value < 1 + 1e-9)
    with Image.open(out / "cka.png") as picture:
        assert picture.width > 300 and picture.height > 300
    assert f"CKA of 4 layers of 2 models on {N_PHOTOS} images" in done.stdout + done.stderr
