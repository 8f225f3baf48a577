"""decode=gpu: JPEGs decoded, resized and normalised on the GPU, in batches.

The loader's processes only read the files and check their headers (`JpegDataset`); the main
process decodes each batch's JPEGs with torchvision's `decode_jpeg` (nvJPEG on CUDA) and
transforms them there as `preprocess.build_transform` does with OpenCV (`DeviceTransform`):
resize the short side, centre-crop, normalise. What the device decoder would not render as
OpenCV does (other formats; CMYK, 12-bit, arithmetic-coded or EXIF-rotated JPEGs) is decoded
on the CPU in the loader as before, and a JPEG the device decoder refuses falls back to the
CPU in the main process; one that fails there too is a failure row like any other.

All of it runs on the CPU as well (device="cpu" uses torchvision's libjpeg decoder), which is
how the tests check it against the OpenCV path.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.images.decode import failure
from pipeline.images.formats import read_header
from pipeline.images.loader import Batch, ImageDataset, stack
from pipeline.images.preprocess import Preprocess

# Pixels decoded at once: the decoded images of a batch of phone photos (12 MP, 36 MB each)
# would otherwise all sit on the GPU together before they are resized.
DECODE_PIXELS = 2**28
# torch's modes for build_transform's OpenCV interpolations when enlarging (a reduction is
# always area interpolation, as build_transform asks OpenCV for).
UPSCALE_MODES = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "area": "bilinear",
    "lanczos": "bicubic",  # torch has no Lanczos
}


@dataclass
class JpegBatch:
    """A batch as the loader's processes hand it over: what they decoded on the CPU (with the
    failures), and the JPEGs left to the device, their files' bytes end to end in one tensor
    (one shared-memory segment per batch, not one per image: file descriptors run out)."""

    decoded: Batch
    jpeg_indices: list[int]
    data: torch.Tensor  # uint8, the JPEGs' bytes one after the other, on the CPU
    ends: list[int]  # where each JPEG ends in `data`
    pixels: list[int]  # width x height of each, from its header

    @property
    def jpegs(self) -> list[torch.Tensor]:
        """Each JPEG's bytes: 1-D uint8 views of `data`, as decode_jpeg takes them."""
        starts = [0, *self.ends][:-1]
        return [self.data[a:b] for a, b in zip(starts, self.ends, strict=True)]

    def pin_memory(self) -> JpegBatch:
        self.decoded.pin_memory()
        return self


class JpegDataset(ImageDataset):
    """ImageDataset that leaves device-decodable JPEGs undecoded: it returns their bytes."""

    def __getitem__(  # type: ignore[override]
        self, index: int
    ) -> tuple[int, torch.Tensor | None, bytes | None, int, tuple[str, str] | None]:
        try:
            data = self.read(index)
            if data:
                header = read_header(data)
                pixels = header.width * header.height
                if header.device_decodable and pixels <= self.max_pixels:
                    return index, None, data[: header.end], pixels, None
            return index, self.transformed(data), None, 0, None
        except Exception as err:
            return index, None, None, 0, failure(err)


def collate_jpegs(
    samples: list[tuple[int, torch.Tensor | None, bytes | None, int, tuple | None]],
) -> JpegBatch:
    decoded = [(i, x) for i, x, _, _, _ in samples if x is not None]
    jpegs = [(i, j, p) for i, _, j, p, _ in samples if j is not None]
    data = b"".join(j for _, j, _ in jpegs)
    return JpegBatch(
        decoded=Batch(
            indices=[i for i, _ in decoded],
            images=stack(x for _, x in decoded),
            failures=[(i, *err) for i, _, _, _, err in samples if err is not None],
        ),
        jpeg_indices=[i for i, _, _ in jpegs],
        data=torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8),
        ends=list(itertools.accumulate(len(j) for _, j, _ in jpegs)),
        pixels=[p for _, _, p in jpegs],
    )


class DeviceTransform:
    """build_transform's resize, centre crop and normalisation, on decoded uint8 (C, H, W)
    tensors wherever they are: the same output sizes, crop offsets and filters as
    albumentations with OpenCV.

    A reduction is OpenCV's area interpolation, computed exactly: each output pixel the mean of
    the input pixels it covers, partly covered ones weighted by the part, as two matrix
    products (rows, then columns) whose matrices keep only the rows and columns the centre
    crop keeps. torch's antialiased bilinear is a triangle filter, not a box: on real photos
    with real weights that alone moved embeddings to cosine 0.985 of the CPU's.
    """

    def __init__(self, preprocess: Preprocess, device: torch.device) -> None:
        _, self.height, self.width = preprocess.input_size
        self.resize_to = preprocess.resize_to
        self.square = self.height == self.width
        self.upscale_mode = UPSCALE_MODES[preprocess.interpolation]
        self.device = device
        self.mean = torch.tensor(preprocess.mean, device=device).view(3, 1, 1) * 255
        self.std = torch.tensor(preprocess.std, device=device).view(3, 1, 1) * 255
        self._weights: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: the short side to the target (SmallestMaxSize,
        rounded as albumentations rounds), or the fixed size for a non-square input (Resize)."""
        if not self.square:
            return self.resize_to
        scale = self.resize_to[0] / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One image, uint8 (C, H, W) -> normalised float32 (C, input height, input width)."""
        height, width = image.shape[-2:]
        target = self.size(height, width)
        top, left = (target[0] - self.height) // 2, (target[1] - self.width) // 2
        x = image.float()
        if target[0] <= height and target[1] <= width and target != (height, width):
            rows = self._area(height, target[0], top, self.height)
            columns = self._area(width, target[1], left, self.width)
            x = (rows @ x @ columns.T).round_()  # OpenCV rounds to uint8
        else:
            if target != (height, width):  # enlarged (on either side): OpenCV's own filter
                mode = self.upscale_mode
                x = F.interpolate(
                    x[None],
                    size=target,
                    mode=mode,
                    **({} if mode == "nearest" else {"align_corners": False}),
                )[0]
                x = x.round_().clamp_(0, 255)  # bicubic overshoots; OpenCV saturates
            x = x[:, top : top + self.height, left : left + self.width]
        return (x - self.mean) / self.std

    def _area(self, size: int, target: int, start: int, count: int) -> torch.Tensor:
        """(count, size): rows start..start+count of the area reduction from size to target."""
        key = (size, target, start, count)
        if key not in self._weights:
            scale = size / target
            begin = (torch.arange(start, start + count, dtype=torch.float64) * scale)[:, None]
            pixel = torch.arange(size, dtype=torch.float64)[None, :]
            covered = torch.minimum(begin + scale, pixel + 1) - torch.maximum(begin, pixel)
            weights = (covered.clamp_(min=0) / scale).float().to(self.device)
            if len(self._weights) > 64:  # photos come in a few sizes; odd ones do not pile up
                self._weights.clear()
            self._weights[key] = weights
        return self._weights[key]


class DeviceDecoder:
    """Turns each JpegBatch into a Batch whose images are on `device`, in manifest order.

    Args:
        dataset: the loader's dataset, whose CPU decode (`transformed`) is the fallback.
        preprocess: the model's preprocessing.
        device: where JPEGs are decoded and transformed (cuda; cpu in the tests).
    """

    def __init__(self, dataset: ImageDataset, preprocess: Preprocess, device: torch.device) -> None:
        self.dataset = dataset
        self.device = device
        self.transform = DeviceTransform(preprocess, device)

    def __call__(self, batch: JpegBatch) -> Batch:
        # The pixels in float32 whatever autocast the model runs under: the resize's matrix
        # products in bf16 would move them by a grey level.
        with torch.autocast(self.device.type, enabled=False):
            return self._batch(batch)

    def _batch(self, batch: JpegBatch) -> Batch:
        images: dict[int, torch.Tensor] = {}
        failures = list(batch.decoded.failures)
        if batch.decoded.images is not None:
            on_device = batch.decoded.images.to(self.device, non_blocking=True)
            images.update(zip(batch.decoded.indices, on_device, strict=True))
        all_jpegs = batch.jpegs
        for group in _groups(batch.pixels, DECODE_PIXELS):
            indices = [batch.jpeg_indices[g] for g in group]
            jpegs = [all_jpegs[g] for g in group]
            for index, jpeg, image in zip(indices, jpegs, self._decode(jpegs), strict=True):
                if image is not None:
                    images[index] = self.transform(image)
                    continue
                try:  # the device decoder refused it: OpenCV on the CPU, as decode=cpu would
                    images[index] = self.dataset.transformed(jpeg.numpy().tobytes()).to(self.device)
                except Exception as err:
                    failures.append((index, *failure(err)))
        order = sorted(images)
        return Batch(
            indices=order,
            images=torch.stack([images[i] for i in order]) if order else None,
            failures=sorted(failures),
        )

    def _decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded uint8 RGB (3, H, W) each, None where the decoder refuses one. One call for
        the group (nvJPEG's batched decode); when it raises, one call per image, to tell which."""
        with _quiet():
            try:
                return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                return [self._decode_one(jpeg) for jpeg in jpegs]

    def _decode_one(self, jpeg: torch.Tensor) -> torch.Tensor | None:
        try:  # inside _decode's _quiet()
            return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None


def decoder_problem(device: torch.device) -> str | None:
    """Why torchvision cannot decode a JPEG on `device` (a build without nvJPEG, a driver
    that refuses), or None when it can."""
    tiny = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1]
    try:
        with _quiet():
            decode_jpeg([torch.from_numpy(tiny)], mode=ImageReadMode.RGB, device=device)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 deprecates its decoders in favour of TorchCodec, warning on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        yield


def _groups(pixels: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive positions whose pixels add up to at most `budget` (at least one each)."""
    group: list[int] = []
    total = 0
    for position, count in enumerate(pixels):
        if group and total + count > budget:
            yield group
            group, total = [], 0
        group.append(position)
        total += count
    if group:
        yield group
