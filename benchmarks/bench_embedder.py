"""Forward pass of the embedder per image, by images per pass (``batch_size``).

Embeds the first 64 training images of ELPV mono (``iter_tensors``, the
embedder alone) with ``batch_size=32``, ``"auto"`` and a few other values,
the settings alternating within each repeat so that all see the same
machine, and prints the best ms per image of each. The ResNets run with
random weights (``weights=None``): the time does not depend on them.

Run: python benchmarks/bench_embedder.py [--threads 2] [--repeats 3]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# (backbone, input side, other images per pass to compare)
SETTINGS = [
    ("efficientnet_lite0", 224, (4, 8)),
    ("efficientnet_lite0", 320, (3,)),
    ("resnet18", 224, (8,)),
    ("wide_resnet50_2", 224, (8,)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import _data
    from skpatch import PatchEmbedder

    torch.set_num_threads(args.threads)
    X = _data.load("mono")[0][:64]
    print(f"ms per image, {len(X)} ELPV images, {args.threads} threads, best of {args.repeats}\n")
    print(f"{'backbone, input':<26}{'32 per pass':>12}{'auto (per pass)':>18}  other passes")
    for backbone, side, others in SETTINGS:
        weights = "imagenet" if backbone.startswith("efficientnet") else None
        sizes = [32, "auto", *others]
        embedders = {
            size: PatchEmbedder(backbone, weights=weights, image_size=side, crop_size=None,
                                batch_size=size)
            for size in sizes
        }
        best = dict.fromkeys(sizes, float("inf"))
        for embedder in embedders.values():
            embedder.transform(X[:2])  # builds the network outside the timings
        for _ in range(args.repeats):
            for size, embedder in embedders.items():
                start = time.perf_counter()
                for _ in embedder.iter_tensors(X):
                    pass
                best[size] = min(best[size], 1000 * (time.perf_counter() - start) / len(X))
        # images per pass of "auto": the embedder's own choice, as it yields them
        per_pass = len(next(embedders["auto"].iter_tensors(X))[1])
        auto = f"{best['auto']:.1f} ({per_pass})"
        other = ", ".join(f"{best[size]:.1f} ({size})" for size in others)
        print(f"{backbone + ', ' + str(side):<26}{best[32]:>12.1f}{auto:>18}  {other}")


if __name__ == "__main__":
    main()
