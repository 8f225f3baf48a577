"""decode=gpu, checked on the CPU against the OpenCV path: torchvision's decode_jpeg runs on the
CPU as well, so the batching, the transform, the fallbacks and the wiring into the extraction
are all tested here; the same on CUDA where there is one."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from pipeline import extract
from pipeline.config import Decode
from pipeline.extraction.devices import plan_loader
from pipeline.extraction.engines import local
from pipeline.extraction.engines.local import loader_batches
from pipeline.extraction.hooks import LayerHooks
from pipeline.extraction.models import build_model
from pipeline.images import gpu_decode
from pipeline.images.formats import read_header
from pipeline.images.gpu_decode import DeviceDecoder, DeviceTransform, JpegDataset, _groups
from pipeline.images.loader import ImageDataset
from pipeline.images.preprocess import Preprocess, build_transform, resolve_preprocess
from pipeline.storage.contract import read_metadata

from conftest import composed, jpeg_bytes, pil_bytes, png_bytes, run_cli

CPU = torch.device("cpu")
IMAGENET = Preprocess(
    (3, 224, 224), 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
)
PHOTOS = {
    name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")
} | dict(zip(("china", "flower"), load_sample_images().images, strict=True))


def _jpeg(rgb: np.ndarray, width: int, height: int, quality: int = 90) -> bytes:
    return jpeg_bytes(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA), quality)


def _pil(rgb: np.ndarray, mode: str = "RGB", **options: object) -> bytes:
    return pil_bytes(rgb, "JPEG", mode, quality=90, **options)


def _rotated(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return _pil(rgb, exif=exif.tobytes())


def _bad_huffman(jpeg: bytes) -> bytes:
    """`jpeg` with its first Huffman table overwritten: every segment still where it was, so
    the header walk passes, and every decoder refuses it."""
    at = jpeg.index(b"\xff\xc4") + 4
    return jpeg[:at] + b"\xff" * 17 + jpeg[at + 17 :]


SMALL = cv2.resize(PHOTOS["chelsea"], (500, 375), interpolation=cv2.INTER_AREA)
SPECIAL = {  # name -> (bytes, decoded on the device?)
    "grey.jpg": (_pil(SMALL, "L"), True),
    "progressive.jpg": (_pil(SMALL, progressive=True), True),
    "rotated.jpg": (_rotated(SMALL), False),
    "cmyk.jpg": (_pil(SMALL, "CMYK"), False),
    "photo.png": (png_bytes(SMALL), False),
}
BROKEN = {
    "bad-huffman.jpg": _bad_huffman(_jpeg(SMALL, 500, 375)),
    "truncated.jpg": _jpeg(SMALL, 500, 375)[:5000],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six photos as 500x375 JPEGs, the special cases the device leaves to the CPU, and
    two files nothing decodes."""
    root = tmp_path_factory.mktemp("gpu-decode")
    for name, rgb in PHOTOS.items():
        (root / f"{name}.jpg").write_bytes(_jpeg(rgb, 500, 375))
    for name, (content, _) in SPECIAL.items():
        (root / name).write_bytes(content)
    for name, content in BROKEN.items():
        (root / name).write_bytes(content)
    return root


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three photos as large JPEGs, one of them portrait: the CPU decodes them at reduced
    scale (1/2 or 1/4 here), the device in full."""
    root = tmp_path_factory.mktemp("gpu-decode-large")
    for name, (width, height) in {
        "astronaut": (2000, 1500),
        "rocket": (1500, 2000),
        "china": (1280, 960),
    }.items():
        big = cv2.resize(PHOTOS[name], (width, height), interpolation=cv2.INTER_CUBIC)
        (root / f"large-{name}.jpg").write_bytes(_jpeg(big, width, height))
    return root


@pytest.mark.parametrize("name", SPECIAL)
def test_the_header_tells_which_jpegs_the_device_decodes_as_opencv_does(name: str) -> None:
    content, on_device = SPECIAL[name]
    assert read_header(content).device_decodable is on_device
    assert read_header(_jpeg(SMALL, 500, 375)).device_decodable


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double())


@pytest.mark.parametrize(
    ("width", "height"),
    [(500, 375), (375, 500), (256, 256), (300, 300), (120, 90), (2000, 1500), (900, 260)],
)
@pytest.mark.parametrize(
    "preprocess",
    [
        IMAGENET,
        Preprocess((3, 160, 224), 0.9, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
    ids=["imagenet", "non-square-bicubic"],
)
def test_device_transform_matches_the_opencv_transform(
    width: int, height: int, preprocess: Preprocess
) -> None:
    """Same output size and crop as albumentations, for reductions, enlargements and
    non-square inputs; the pixels differ only by the filter (area vs antialiased bilinear)."""
    rgb = cv2.resize(PHOTOS["astronaut"], (width, height), interpolation=cv2.INTER_AREA)
    cpu = build_transform(preprocess)(image=rgb)["image"]
    device = DeviceTransform(preprocess, CPU)(torch.from_numpy(rgb).permute(2, 0, 1))
    assert device.shape == cpu.shape == preprocess.input_size
    assert _cosine(device[None], cpu[None]).item() >= 0.999
    assert (device - cpu).abs().mean() < 0.05  # in normalised units: a few grey levels


def _batches(folder: Path, decode: Decode, workers: int) -> tuple[list[str], list]:
    paths = sorted(str(p) for p in folder.iterdir())
    dataset = (JpegDataset if decode is Decode.gpu else ImageDataset)(
        paths, build_transform(IMAGENET), min_side=IMAGENET.min_side
    )
    plan = plan_loader(workers, batches=3, device=CPU)
    return paths, list(loader_batches(dataset, 5, plan, IMAGENET, CPU))


def _by_name(paths: list[str], batches: list) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    images, failures = {}, {}
    for batch in batches:
        assert batch.indices == sorted(batch.indices)
        if batch.images is not None:
            names = [Path(paths[i]).name for i in batch.indices]
            images.update(zip(names, batch.images, strict=True))
        failures.update((Path(paths[i]).name, error) for i, error, _ in batch.failures)
    return images, failures


def test_device_decoded_batches_match_the_cpu_path(folder: Path) -> None:
    """Through loader processes (2), in batches of 5: the same images in the same order, the
    same failures; files left to the CPU identical, the device's within cosine 0.999."""
    paths, gpu = _batches(folder, Decode.gpu, workers=2)
    _, cpu = _batches(folder, Decode.cpu, workers=0)
    gpu_images, gpu_failures = _by_name(paths, gpu)
    cpu_images, cpu_failures = _by_name(paths, cpu)
    assert gpu_failures == cpu_failures == dict.fromkeys(BROKEN, "ImageError")
    assert gpu_images.keys() == cpu_images.keys()
    for name, image in gpu_images.items():
        if name in SPECIAL and not SPECIAL[name][1]:
            torch.testing.assert_close(image, cpu_images[name], rtol=0, atol=0)
        else:
            assert _cosine(image[None], cpu_images[name][None]).item() >= 0.999, name


@pytest.fixture(scope="module")
def lite0() -> tuple[torch.nn.Module, Preprocess]:
    """EfficientNet-Lite0 with its real ImageNet weights (shipped on PyPI): random weights map
    every photo to nearly the same direction, which would make any cosine check pass."""
    cfg = composed("model=efficientnet_lite0").model
    model = build_model(cfg)
    return model, resolve_preprocess(model, mean=cfg.mean, std=cfg.std)


def _inputs(
    paths: list[str], preprocess: Preprocess, dataset_cls: type[ImageDataset], reduced: bool = True
) -> torch.Tensor:
    dataset = dataset_cls(
        paths, build_transform(preprocess), min_side=preprocess.min_side if reduced else None
    )
    plan = plan_loader(0, batches=1, device=CPU)
    (batch,) = loader_batches(dataset, len(paths), plan, preprocess, CPU)
    assert batch.indices == list(range(len(paths)))
    return batch.images


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_embeddings_from_device_decoding_match_the_cpu_path(
    folder: Path, large: Path, lite0: tuple[torch.nn.Module, Preprocess], autocast: bool
) -> None:
    """Per row: cosine >= 0.999 in fp32, >= 0.99 under autocast (bf16 on the CPU standing in
    for the GPU's AMP), against the OpenCV path in fp32. Large JPEGs are compared with the
    OpenCV path decoding them in full, as the device does: the CPU's reduced-scale decode is
    a further, measured difference."""
    model, preprocess = lite0
    small = sorted(str(p) for p in folder.iterdir() if p.name not in BROKEN)
    big = sorted(str(p) for p in large.iterdir())
    reference = torch.cat(
        [_inputs(small, preprocess, ImageDataset), _inputs(big, preprocess, ImageDataset, False)]
    )
    reduced = _inputs(big, preprocess, ImageDataset)
    device = _inputs(small + big, preprocess, JpegDataset)
    with torch.inference_mode(), LayerHooks(model, ["global_pool"]) as hooks:
        expected = hooks(reference)["global_pool"]
        reduced = hooks(reduced)["global_pool"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = hooks(device)["global_pool"].float()
    cosine = _cosine(got, expected)
    assert cosine.min().item() >= (0.99 if autocast else 0.999), dict(
        zip((Path(p).name for p in small + big), cosine.tolist(), strict=True)
    )
    # The CPU's reduced-scale decode of these (smooth, upscaled) photos, against a full decode.
    assert _cosine(reduced, expected[len(small) :]).min().item() >= 0.99
    # Different photos stay apart: the checks above could not pass by collapse.
    photos = expected[[small.index(str(folder / f"{name}.jpg")) for name in PHOTOS]]
    assert _cosine(photos, photos.roll(1, 0)).max() < 0.9


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_cpu(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched call raises, so each JPEG is decoded alone: the one the decoder refuses
    (as nvJPEG refuses variants libjpeg reads) comes from OpenCV, the others from the device."""
    refused = (folder / "coffee.jpg").read_bytes()
    real = gpu_decode.decode_jpeg
    calls = []

    def picky(data: torch.Tensor | list[torch.Tensor], **kwargs: object) -> object:
        calls.append(len(data) if isinstance(data, list) else 1)
        items = data if isinstance(data, list) else [data]
        if any(item.numpy().tobytes() == refused for item in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", picky)
    names = ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    dataset = JpegDataset([str(folder / n) for n in names], build_transform(IMAGENET))
    loaded = gpu_decode.collate_jpegs([dataset[i] for i in range(len(names))])
    batch = DeviceDecoder(dataset, IMAGENET, CPU)(loaded)
    assert calls == [3, 1, 1, 1] and batch.indices == [0, 1, 2] and not batch.failures
    torch.testing.assert_close(batch.images[1], dataset.transformed(refused), rtol=0, atol=0)
    assert not torch.equal(batch.images[0], dataset.transformed((folder / names[0]).read_bytes()))


def test_the_device_pixels_ignore_the_models_autocast(large: Path) -> None:
    """The model runs under autocast (AMP); the decoding and resizing before it do not."""
    dataset = JpegDataset(sorted(str(p) for p in large.iterdir()), build_transform(IMAGENET))
    loaded = gpu_decode.collate_jpegs([dataset[i] for i in range(len(dataset))])
    decoder = DeviceDecoder(dataset, IMAGENET, CPU)
    plain = decoder(loaded).images
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = decoder(loaded).images
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


def test_groups_keep_to_the_pixel_budget() -> None:
    assert list(_groups([4, 4, 4, 9, 1], budget=8)) == [[0, 1], [2], [3], [4]]
    assert list(_groups([], budget=8)) == []


def test_decode_gpu_through_the_extraction_on_the_cpu(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """extract.run with the device path forced onto the CPU: the same rows and failures as
    decode=cpu, and the metadata says which decoder made them. (At 224, JPEGs of 500x375 are
    decoded in full on the CPU too.)"""
    args = [
        "model=timm",
        "model.name=test_efficientnet",
        "model.pretrained=false",
        "model.input_size=[3,224,224]",
        "dataset=folder",
        f"dataset.root={folder}",
        "batch_size=4",
        "num_workers=2",
        "tracking=none",
    ]
    extract.run(composed(*args, f"output_dir={tmp_path}/cpu"))
    monkeypatch.setattr(local, "resolve_decode", lambda decode, device: Decode.gpu)
    extract.run(composed(*args, "decode=gpu", f"output_dir={tmp_path}/gpu"))
    frames = {d: pd.read_parquet(tmp_path / d / "global_pool.parquet") for d in ("cpu", "gpu")}
    assert frames["gpu"]["image_id"].tolist() == frames["cpu"]["image_id"].tolist()
    failures = {d: pd.read_parquet(tmp_path / d / "failures.parquet") for d in ("cpu", "gpu")}
    pd.testing.assert_frame_equal(failures["gpu"], failures["cpu"])
    a, b = (torch.from_numpy(np.stack(f["embedding"].to_numpy())) for f in frames.values())
    assert _cosine(a, b).min() >= 0.999
    assert read_metadata(tmp_path / "gpu/global_pool.parquet")["preprocess"]["decode"] == "gpu"
    assert read_metadata(tmp_path / "cpu/global_pool.parquet")["preprocess"]["decode"] == "cpu"


# --- on a GPU ------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "floor"), [("fp32", 0.999), ("auto", 0.99)])
def test_gpu_decoding_matches_cpu_decoding_on_cuda(
    tmp_path: Path, folder: Path, precision: str, floor: float
) -> None:
    """decode=gpu (nvJPEG) against decode=cpu in fp32, per row; AMP (precision=auto) too."""
    args = [
        "model=efficientnet_lite0",
        "dataset=folder",
        f"dataset.root={folder}",
        "device=cuda",
        "batch_size=4",
        "tracking=none",
    ]
    runs = {
        "cpu": [*args, "decode=cpu", "precision=fp32"],
        "gpu": [*args, "decode=gpu", f"precision={precision}"],
    }
    for name, overrides in runs.items():
        done = run_cli(*overrides, f"output_dir={tmp_path}/{name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    frames = {d: pd.read_parquet(tmp_path / d / "global_pool.parquet") for d in runs}
    assert frames["gpu"]["image_id"].tolist() == frames["cpu"]["image_id"].tolist()
    failures = {d: pd.read_parquet(tmp_path / d / "failures.parquet") for d in runs}
    assert failures["gpu"]["image_id"].tolist() == sorted(BROKEN)
    pd.testing.assert_frame_equal(failures["gpu"], failures["cpu"])
    a, b = (torch.from_numpy(np.stack(f["embedding"].to_numpy())) for f in frames.values())
    assert _cosine(a, b).min() >= floor
