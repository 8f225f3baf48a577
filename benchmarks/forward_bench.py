"""The model's forward pass as the pipeline runs it, against the same pass without each of its
settings, side by side in one process on the same batch: the default layout with glibc's
default malloc, channels-last (`devices.place_model` / `model_input`), and channels-last
with freed memory kept for the next batch (`devices.keep_freed_memory`). Each variant
runs --repeats rounds after a warm-up round, in turn, and its best round counts; the outputs are
compared as 1 - cosine similarity per row (the largest).

    python benchmarks/forward_bench.py [--models efficientnet_lite0 resnet18 ...] [--batch 32]
        [--repeats 3] [--device cpu]

Random weights (timm's architectures, built offline). The memory setting only acts where the C
library is glibc and matters on the CPU; the pipeline's entry points keep it for their batches.
"""

from __future__ import annotations

import argparse
import os
import time

import timm
import torch

from pipeline.extraction.devices import give_back_freed_memory, keep_freed_memory

MODELS = [
    "efficientnet_lite0",
    "efficientnet_b0",
    "resnet18",
    "resnet50",
    "convnext_tiny",
    "vit_small_patch16_224",
]


def images_per_second(
    model: torch.nn.Module, x: torch.Tensor, repeats: int
) -> tuple[float, torch.Tensor]:
    best, output = float("inf"), None
    for _ in range(repeats + 1):  # the first round warms up
        started = time.perf_counter()
        output = model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return len(x) / best, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"{device}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(
        "| model | default images/s | channels-last | ratio | + freed memory kept | ratio "
        "| all / default | max 1 - cosine |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval().to(device)
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        with torch.inference_mode():
            plain, a = images_per_second(model, x, args.repeats)
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            last, b = images_per_second(model, x, args.repeats)
            keep_freed_memory()
            try:
                kept, c = images_per_second(model, x, args.repeats)
            finally:
                give_back_freed_memory()
        gap = max(
            1 - torch.nn.functional.cosine_similarity(a.float(), y.float()).min().item()
            for y in (b, c)
        )
        print(
            f"| {name} | {plain:.1f} | {last:.1f} | {last / plain:.2f} | {kept:.1f} | "
            f"{kept / last:.2f} | {kept / plain:.2f} | {gap:.1e} |"
        )


if __name__ == "__main__":
    main()
