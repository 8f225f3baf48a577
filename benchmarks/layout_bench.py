"""Channels-last against the default layout, side by side in one process: each model's forward
pass on the same batch in both layouts, in turn, the best of --repeats rounds of each, and the
largest difference between the outputs (as 1 - cosine similarity per row).

    python benchmarks/layout_bench.py [--models efficientnet_lite0 resnet18 ...] [--batch 32]
        [--repeats 3] [--device cpu]

Random weights (timm's architectures, built offline). `pipeline.devices.place_model` and
`model_input` put every model and batch of the pipeline in channels-last on this evidence.
"""

from __future__ import annotations

import argparse
import os
import time

import timm
import torch

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
    print("| model | default images/s | channels-last images/s | ratio | max 1 - cosine |")
    print("|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval().to(device)
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        with torch.inference_mode():
            plain, a = images_per_second(model, x, args.repeats)
            model.to(memory_format=torch.channels_last)
            last, b = images_per_second(
                model, x.contiguous(memory_format=torch.channels_last), args.repeats
            )
        gap = 1 - torch.nn.functional.cosine_similarity(a.float(), b.float()).min().item()
        print(f"| {name} | {plain:.1f} | {last:.1f} | {last / plain:.2f} | {gap:.1e} |")


if __name__ == "__main__":
    main()
