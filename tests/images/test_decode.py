"""Reading and decoding hostile, odd and large files: truncation, bombs, non-files, names, scale."""

from __future__ import annotations

import io
import os
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
import timm
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.images import decode
from pipeline.images import manifest as manifests
from pipeline.images.decode import decode_image
from pipeline.images.formats import ImageError, read_image_file
from pipeline.images.loader import ImageDataset
from pipeline.images.manifest import folder_manifest, table_manifest
from pipeline.images.preprocess import Preprocess, build_transform

from conftest import jpeg_bytes, pil_bytes, png_bytes

PHOTO = cv2.resize(skimage.data.astronaut(), (500, 375), interpolation=cv2.INTER_AREA)
IMAGENET = Preprocess(
    (3, 224, 224), 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
)


def _with_comment(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with a COM segment holding `payload` right after its start-of-image marker."""
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


# --- truncation ---------------------------------------------------------------------------------

THUMBNAIL = jpeg_bytes(PHOTO[::8, ::8])
FILES = {
    "jpeg": jpeg_bytes(PHOTO),
    "progressive": pil_bytes(PHOTO, "JPEG", quality=90, progressive=True),
    "thumbnail": _with_comment(jpeg_bytes(PHOTO), THUMBNAIL),  # markers inside a segment
    "png": png_bytes(PHOTO),
}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9, 0.999, -1])
def test_files_cut_short_are_refused_as_truncated(name: str, keep: float) -> None:
    whole = FILES[name]
    cut = len(whole) - 1 if keep == -1 else int(len(whole) * keep)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(whole[:cut])


def test_a_cut_that_ends_on_an_embedded_thumbnail_is_still_truncated() -> None:
    """The old tail check saw the thumbnail's end-of-image marker and let this through."""
    whole = FILES["thumbnail"]
    cut = whole.index(THUMBNAIL) + len(THUMBNAIL)
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(whole[:cut])


@pytest.mark.parametrize("name", FILES)
def test_bytes_after_the_image_are_ignored(name: str) -> None:
    """A motion photo's MP4 after the JPEG, padding after a PNG: same pixels as the clean file."""
    video = b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(100_000)
    clean = decode_image(FILES[name])
    for trailer in (video, b"\x00" * 4096, b"\xff\xd9" + video):
        assert np.array_equal(decode_image(FILES[name] + trailer), clean)


# --- sizes: decompression bombs and file sizes --------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(decode.cv2, "imdecode", refuse)


def _hdr(width: int, height: int) -> bytes:
    """A 1x1 Radiance HDR file whose header claims `width` x `height`."""
    tiny = cv2.imencode(".hdr", np.ones((1, 1, 3), np.float32))[1].tobytes()
    assert b"-Y 1 +X 1\n" in tiny
    return tiny.replace(b"-Y 1 +X 1\n", f"-Y {height} +X {width}\n".encode(), 1)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (_hdr(14_000, 14_000), "Radiance HDR"),  # OpenCV would allocate 2.3 GB for it
        (_hdr(1, 1), "Radiance HDR"),
        (cv2.imencode(".pfm", np.ones((2, 2, 3), np.float32))[1].tobytes(), "PFM"),
        (cv2.imencode(".ppm", np.ones((2, 2, 3), np.uint8))[1].tobytes(), "PNM"),
        (cv2.imencode(".ras", np.ones((2, 2, 3), np.uint8))[1].tobytes(), "Sun raster"),
    ],
    ids=["hdr-14000x14000", "hdr-1x1", "pfm", "ppm", "sun-raster"],
)
def test_formats_that_cannot_be_sized_first_are_refused_undecoded(
    content: bytes, kind: str, no_decoding: None, tmp_path: Path
) -> None:
    """Named x.png or not: the bytes decide, and nothing is decoded to find the size."""
    with pytest.raises(ImageError) as refused:
        decode_image(content)
    assert str(refused.value).startswith(f"{kind} image: not read, as its size cannot be checked")
    (tmp_path / "x.png").write_bytes(content)
    _, tensor, failure = ImageDataset([str(tmp_path / "x.png")], build_transform(IMAGENET))[0]
    assert tensor is None and failure == ("ImageError", str(refused.value))


def _webp_with_exif(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "camera"  # any tag: EXIF makes it an extended (VP8X) file
    return pil_bytes(rgb, "WEBP", quality=80, exif=exif.tobytes())


SIZED = {
    "jpeg": lambda rgb: jpeg_bytes(rgb),
    "progressive-jpeg": lambda rgb: pil_bytes(rgb, "JPEG", progressive=True),
    "png": png_bytes,
    "bmp": lambda rgb: cv2.imencode(".bmp", rgb)[1].tobytes(),
    "bmp-top-down": lambda rgb: (
        pil_bytes(rgb, "BMP")[:22]
        + (-rgb.shape[0]).to_bytes(4, "little", signed=True)
        + pil_bytes(rgb[::-1], "BMP")[26:]
    ),
    "tiff": lambda rgb: cv2.imencode(".tif", rgb)[1].tobytes(),
    "bigtiff": lambda rgb: pil_bytes(rgb, "TIFF", big_tiff=True),
    "webp-lossy": lambda rgb: pil_bytes(rgb, "WEBP", quality=80),
    "webp-lossless": lambda rgb: pil_bytes(rgb, "WEBP", lossless=True),
    "webp-extended": _webp_with_exif,
}


@pytest.mark.parametrize("kind", SIZED)
def test_each_readable_format_is_sized_from_its_own_header(kind: str) -> None:
    content = SIZED[kind](PHOTO[:20, :30].copy())
    assert decode_image(content, max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(ImageError, match=r"^30x20 pixels, over max_image_pixels=599"):
        decode_image(content, max_pixels=599)


def test_what_opencv_raises_is_an_image_error() -> None:
    """1,100,000 pixels pass max_pixels but not OpenCV's own width limit (2**20), which raises."""
    wide = cv2.imencode(".bmp", np.zeros((1, 1_100_000), np.uint8))[1].tobytes()
    with pytest.raises(ImageError, match=r"OpenCV cannot decode it: .*CV_IO_MAX_IMAGE_WIDTH"):
        decode_image(wide)


def test_file_size_is_checked_before_the_file_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    with big.open("wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB that take no disk, and would take memory if read
    transform = build_transform(IMAGENET)
    tracemalloc.start()  # read, the file would be 3 GiB in memory: the peak says whether it was
    try:
        with pytest.raises(ImageError, match=rf"^{3 * 2**30} bytes, over max_file_bytes={2**28}"):
            read_image_file(str(big))
        _, tensor, failure = ImageDataset([str(big)], transform)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated: the file was read"
    assert tensor is None and "over max_file_bytes" in failure[1]
    (tmp_path / "small.png").write_bytes(png_bytes(PHOTO))
    with pytest.raises(ImageError, match="over max_file_bytes=1000"):
        read_image_file(str(tmp_path / "small.png"), max_bytes=1000)


# --- what a folder holds ------------------------------------------------------------------------


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fails a test that blocks (on a FIFO, say) instead of letting it hang the suite."""

    def timeout(*_: object) -> None:
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_entries_that_are_not_files_become_failures_without_hanging(
    tmp_path: Path, alarm: None
) -> None:
    root = tmp_path / "root"
    (root / "folder.jpg").mkdir(parents=True)
    (root / "good.png").write_bytes(png_bytes(PHOTO))
    os.mkfifo(root / "pipe.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "broken.png").symlink_to("gone.png")
    (root / "sub").mkdir()
    (root / "sub" / "again").symlink_to(root, target_is_directory=True)  # a folder loop
    for name in ("a.gif", "b.GIF", "notes.txt", "README"):
        (root / name).write_bytes(b"x")

    manifest = folder_manifest(root, [".jpg", ".png"], labels_from_folders=False)
    assert manifest["image_id"].tolist() == [
        "broken.png",
        "folder.jpg",
        "good.png",
        "loop.jpg",
        "pipe.jpg",
    ]
    assert manifest.attrs["skipped"] == {
        "(no extension)": 1,
        "(symlinked folder)": 1,
        ".gif": 2,
        ".txt": 1,
    }
    dataset = ImageDataset(manifest["path"], build_transform(IMAGENET), errors=manifest["error"])
    results = {manifest["image_id"][i]: dataset[i] for i in range(len(dataset))}
    assert results["good.png"][2] is None
    expected = {
        "broken.png": ("FileNotFoundError", "No such file or directory"),
        "folder.jpg": ("ImageError", "not a regular file (a directory)"),
        "loop.jpg": ("OSError", "Too many levels of symbolic links"),
        "pipe.jpg": ("ImageError", "not a regular file (a FIFO)"),
    }
    for name, (error, reason) in expected.items():
        _, tensor, failure = results[name]
        assert tensor is None and failure[0] == error and reason in failure[1], name


def test_a_folder_that_cannot_be_listed_is_a_failure_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "private").mkdir(parents=True)
    (root / "private" / "x.png").write_bytes(png_bytes(PHOTO))
    (root / "y.png").write_bytes(png_bytes(PHOTO))
    scandir = os.scandir

    def no_private(path: str) -> Iterator[os.DirEntry]:
        if path.endswith("private"):
            raise PermissionError(13, "Permission denied")  # root in a container ignores chmod
        return scandir(path)

    monkeypatch.setattr(manifests.os, "scandir", no_private)
    manifest = folder_manifest(root, [".png"], labels_from_folders=False)
    assert manifest["image_id"].tolist() == ["private", "y.png"]
    assert manifest["error"][0] == "cannot list this folder: Permission denied"
    assert pd.isna(manifest["error"][1])


def test_symlinks_out_of_the_root_fail_unless_allowed(tmp_path: Path) -> None:
    """One rule for folders and manifests: the link's row fails, the rest of the dataset runs."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(PHOTO))
    root = tmp_path / "root"
    root.mkdir()
    (root / "own.png").write_bytes(png_bytes(PHOTO))
    (root / "alias.png").symlink_to(root / "own.png")  # stays inside: fine
    (root / "leak.png").symlink_to(outside / "secret.png")
    (root / "door").symlink_to(outside, target_is_directory=True)
    error = f"symlink points outside dataset.root (to {outside.resolve()}/secret.png)"

    folder = folder_manifest(root, [".png"], labels_from_folders=False).set_index("image_id")
    assert folder.index.tolist() == ["alias.png", "leak.png", "own.png"]
    assert folder["error"][["alias.png", "own.png"]].isna().all()
    assert folder["error"]["leak.png"].startswith(error)
    allowed = folder_manifest(root, [".png"], False, allow_outside_root=True)
    assert allowed["error"].isna().all()

    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": ["own.png", "alias.png", "leak.png", "door/secret.png"]}).to_csv(
        csv, index=False
    )
    table = table_manifest(csv, root, "path", None)
    assert table["error"][:2].isna().all()
    assert table["error"][2].startswith(error) and table["error"][3].startswith(error)
    dataset = ImageDataset(table["path"], build_transform(IMAGENET), errors=table["error"])
    assert dataset[0][2] is None and dataset[3][2] == ("ImageError", table["error"][3])
    assert table_manifest(csv, root, "path", None, True)["error"].isna().all()


# --- names that are not UTF-8 -------------------------------------------------------------------

NOT_UTF8 = "file name is not valid UTF-8: rename it"


def test_names_that_are_not_utf8_get_a_readable_id_and_a_failure(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "cats").mkdir(parents=True)
    raw_root = os.fsencode(root)
    for name in (b"bad\xff.png", b"cats/good.png", b"caf\xe9/x.png"):
        os.makedirs(os.path.dirname(os.path.join(raw_root, name)), exist_ok=True)
        with open(os.path.join(raw_root, name), "wb") as f:
            f.write(png_bytes(PHOTO))  # a valid image: only its name is wrong

    manifest = folder_manifest(root, [".png"], labels_from_folders=True)
    manifest["image_id"].str.encode("utf-8")  # what writing ids to Parquet needs
    manifest["label"].str.encode("utf-8")
    assert manifest["image_id"].tolist() == ["bad\\xff.png", "caf\\xe9/x.png", "cats/good.png"]
    assert manifest["label"].tolist() == ["", "caf\\xe9", "cats"]
    assert manifest["error"][:2].tolist() == [NOT_UTF8] * 2 and pd.isna(manifest["error"][2])
    assert os.path.isfile(manifest["path"][0])  # the path still names the file exactly
    dataset = ImageDataset(manifest["path"], build_transform(IMAGENET), errors=manifest["error"])
    assert dataset[0][1:] == (None, ("ImageError", NOT_UTF8))
    assert dataset[2][2] is None

    # A Latin-1 CSV listing the same files, and a Parquet manifest with a binary path column.
    (tmp_path / "latin1.csv").write_bytes(b"path,label\nbad\xff.png,\xe9t\xe9\ncats/good.png,b\n")
    pd.DataFrame({"path": [b"bad\xff.png", b"cats/good.png"]}).to_parquet(tmp_path / "b.parquet")
    for table in (
        table_manifest(tmp_path / "latin1.csv", root, "path", "label"),
        table_manifest(tmp_path / "b.parquet", root, "path", None),
    ):
        table["image_id"].str.encode("utf-8")
        assert table["image_id"].tolist() == ["bad\\xff.png", "cats/good.png"]
        assert table["error"][0] == NOT_UTF8 and pd.isna(table["error"][1])
        assert os.path.isfile(table["path"][0])
    assert (
        table_manifest(tmp_path / "latin1.csv", root, "path", "label")["label"][0] == "\\xe9t\\xe9"
    )


# --- empty datasets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("header-only.csv", b"path\n", "lists no images"),
        ("empty.csv", b"", "is empty"),
        ("empty.parquet", None, "lists no images"),
    ],
)
def test_an_empty_manifest_is_a_one_line_config_error(
    tmp_path: Path, name: str, content: bytes | None, reason: str
) -> None:
    path = tmp_path / name
    if content is None:
        pd.DataFrame({"path": pd.Series([], dtype=str)}).to_parquet(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^manifest {path} {reason}: check dataset.path$"):
        table_manifest(path, tmp_path, "path", None)


# --- reduced-scale JPEG decoding ----------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpegs() -> list[bytes]:
    """Real photos upscaled to 4000x3000 and saved at quality 90, as a camera would."""
    names = ("astronaut", "chelsea", "coffee", "rocket")
    photos = [getattr(skimage.data, n)() for n in names]
    return [jpeg_bytes(cv2.resize(p, (4000, 3000), interpolation=cv2.INTER_CUBIC)) for p in photos]


def test_large_jpegs_decode_at_reduced_scale_to_the_same_embeddings(
    large_jpegs: list[bytes],
) -> None:
    transform = build_transform(IMAGENET)
    full = [decode_image(d) for d in large_jpegs]
    reduced = [decode_image(d, min_side=IMAGENET.min_side) for d in large_jpegs]
    assert all(r.shape == (375, 500, 3) for r in reduced)  # 1/8: the short side stays >= 256
    a = torch.stack([transform(image=x)["image"] for x in full])
    b = torch.stack([transform(image=x)["image"] for x in reduced])
    assert (a - b).abs().mean(dim=(1, 2, 3)).max() < 0.03  # ~2 of 255 grey levels
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():
        ea, eb = model(a), model(b)
    assert torch.nn.functional.cosine_similarity(ea, eb).min() >= 0.99
    # The bar means something: different photos are far below it.
    assert torch.nn.functional.cosine_similarity(ea, ea.roll(1, 0)).max() < 0.9


def test_reduced_decoding_keeps_exif_orientation_and_rgb(large_jpegs: list[bytes]) -> None:
    photo = Image.open(io.BytesIO(large_jpegs[0]))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=90, exif=exif.tobytes())
    full = decode_image(out.getvalue())
    reduced = decode_image(out.getvalue(), min_side=300)
    assert full.shape == (4000, 3000, 3) and reduced.shape == (500, 375, 3)
    small = cv2.resize(full, (375, 500), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - small).mean() < 2


def test_min_side_leaves_small_jpegs_and_other_formats_whole(tmp_path: Path) -> None:
    large_png = png_bytes(cv2.resize(PHOTO, (2000, 1500)))
    assert decode_image(large_png, min_side=100).shape == (1500, 2000, 3)
    assert decode_image(jpeg_bytes(PHOTO), min_side=IMAGENET.min_side).shape == (375, 500, 3)
    assert decode_image(jpeg_bytes(PHOTO), min_side=180).shape == (188, 250, 3)  # 375/2, rounded up
    large = jpeg_bytes(cv2.resize(PHOTO, (2000, 1500)))
    (tmp_path / "x.jpg").write_bytes(large)
    dataset = ImageDataset([str(tmp_path / "x.jpg")], build_transform(IMAGENET), min_side=256)
    reduced = build_transform(IMAGENET)(image=decode_image(large, min_side=256))["image"]
    assert torch.equal(dataset[0][1], reduced)
