"""`read_layer`, the one input check of the downstream stages: a layer is read only when it is
what its writer promised (`_manifest.json`'s parts, the contract's rows), else refused in one
line that names the file. The same cases through each stage's command: test_hostile.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.storage import inputs
from pipeline.storage.contract import MANIFEST_FILE, METADATA_KEY
from pipeline.storage.inputs import read_layer

from conftest import BROKEN_LAYERS, broken_layer, write_layer, write_parts


def test_a_good_layer_is_read_whole_and_in_order(tmp_path: Path) -> None:
    layer = broken_layer(tmp_path / "l.parquet", "good")
    back = read_layer(layer)
    assert back.ids == [f"{i:02d}.jpg" for i in range(12)] and back.labels == list("abc") * 4
    expected = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    np.testing.assert_array_equal(back.vectors, expected)
    assert len(list(layer.glob("part-*.parquet"))) == 2


@pytest.mark.parametrize("case", BROKEN_LAYERS)
def test_a_broken_promise_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    layer = broken_layer(tmp_path / "l.parquet", case)
    with pytest.raises(ConfigError) as refused:
        read_layer(layer)
    message = str(refused.value)
    assert BROKEN_LAYERS[case] in message and "\n" not in message
    assert str(layer) in message  # the layer, or the part of it that is wrong


def test_verify_false_checks_names_and_sizes_but_not_digests(tmp_path: Path) -> None:
    altered = broken_layer(tmp_path / "altered.parquet", "part altered")
    good = read_layer(broken_layer(tmp_path / "good.parquet", "good"))
    back = read_layer(altered, verify=False)  # the flipped bit goes unseen
    assert back.ids == good.ids and (back.vectors != good.vectors).sum() == 1
    for case in ("part cut short", "part added", "part missing"):
        layer = broken_layer(tmp_path / f"{case}.parquet", case)
        with pytest.raises(ConfigError, match=re.escape(BROKEN_LAYERS[case])):
            read_layer(layer, verify=False)


def test_files_named_with_underscore_or_dot_are_not_parts(tmp_path: Path) -> None:
    """As for pyarrow: the writer may keep other files beside the parts, and the manifest may
    carry more keys than those checked."""
    layer = broken_layer(tmp_path / "l.parquet", "good")
    (layer / "_SUCCESS").write_text("")
    (layer / ".part-000002.parquet.partial").write_bytes(b"half")
    (layer / "_staging").mkdir()
    (layer / "_staging" / "part-000002.parquet").write_bytes(b"not listed")
    manifest = json.loads((layer / MANIFEST_FILE).read_text())
    manifest["written_by"] = {"engine": "ray"}
    manifest["parts"][0]["created"] = "2026-01-01"
    (layer / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert len(ds.dataset(layer).files) == 2  # what pyarrow reads: the two parts only
    assert len(read_layer(layer).ids) == 12


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        {"parts": "part-000000.parquet", "sha256": ""},
        {"parts": [{"name": "part-000000.parquet", "bytes": "many"}], "sha256": ""},
    ],
)
def test_a_manifest_not_in_the_writers_form_is_refused(tmp_path: Path, manifest: object) -> None:
    layer = broken_layer(tmp_path / "l.parquet", "good")
    (layer / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="does not list the layer's parts"):
        read_layer(layer)


def test_a_manifest_whose_digest_is_not_its_parts_is_refused(tmp_path: Path) -> None:
    layer = broken_layer(tmp_path / "l.parquet", "good")
    manifest = json.loads((layer / MANIFEST_FILE).read_text())
    manifest["sha256"] = "0" * 64  # what tracking records as the input: it must be the parts'
    (layer / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="its sha256 is not the digest of the parts it lists"):
        read_layer(layer)


def test_a_layer_written_elsewhere_gets_every_check_but_the_manifests(tmp_path: Path) -> None:
    folder = broken_layer(tmp_path / "folder.parquet", "good")
    (folder / MANIFEST_FILE).unlink()
    assert len(read_layer(folder).ids) == 12
    single = tmp_path / "single.parquet"
    pq.write_table(ds.dataset(folder).to_table(), single)
    assert read_layer(single).ids == read_layer(folder).ids
    for case in ("repeated ids", "NaN", "parts of different dims"):
        layer = broken_layer(tmp_path / f"{case}.parquet", case)
        (layer / MANIFEST_FILE).unlink()
        with pytest.raises(ConfigError, match=re.escape(BROKEN_LAYERS[case])):
            read_layer(layer)


def test_null_values_inside_a_vector_are_refused(tmp_path: Path) -> None:
    values = pa.array([1.0, 2.0, None, 4.0, 5.0, 6.0], pa.float32())
    table = pa.table(
        {
            "image_id": ["a.jpg", "b.jpg"],
            "embedding": pa.FixedSizeListArray.from_arrays(values, 3),
        }
    ).replace_schema_metadata({METADATA_KEY: b"{}"})
    layer = write_parts(tmp_path / "l.parquet", [table])
    with pytest.raises(ConfigError, match=r"part-000000.parquet has null vectors or null values"):
        read_layer(layer)


def test_the_finite_check_names_the_first_bad_image_in_any_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "FINITE_CHECK_VALUES", 3 * 4)  # three rows of 4 values a block
    vectors = np.ones((10, 4))
    vectors[[7, 9], 1] = np.nan
    layer = write_layer(tmp_path / "l.parquet", vectors, [f"{i}.jpg" for i in range(10)], None)
    with pytest.raises(ConfigError, match=r"\(image '7.jpg' first\)"):
        read_layer(layer)


def test_metadata_that_is_not_json_is_refused(tmp_path: Path) -> None:
    layer = broken_layer(tmp_path / "l.parquet", "good")
    table = pq.read_table(layer / "part-000000.parquet")
    shutil.rmtree(layer)
    write_parts(layer, [table.replace_schema_metadata({METADATA_KEY: b"{not json"})])
    with pytest.raises(ConfigError, match="metadata is not a JSON object"):
        read_layer(layer)
