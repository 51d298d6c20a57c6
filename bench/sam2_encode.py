"""SAM2 image-encoder cost on a CPU, per frame, at a training batch of frames: one call over the whole batch
(the naive path) against groundseg's chunks of ``Sam2Decoder.cpu_encode_chunk`` frames.

    python bench/sam2_encode.py [--preset sa2va-shapes] [--frames 32 128] [--chunks 8 16] [--repeats 2]

A batch of 16-frame clips is 128 frames at batch 8 (the Sa2VA memory stage). The model is the preset's SAM2 with
seeded random weights; each row is forward + backward of a sum over the encoder's outputs (training), the best of
``--repeats`` after a warm-up. The ratio column is the naive row's time over the row's, in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from groundseg.config import SA2VA_PRESETS
    from groundseg.decoders.sam2 import Sam2Decoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sa2va-shapes", choices=sorted(SA2VA_PRESETS))
    ap.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    sam = Sam2Decoder(SA2VA_PRESETS[args.preset]().sam2)
    size = sam.image_size

    def step(x: torch.Tensor, chunk: int) -> float:
        sam.cpu_encode_chunk = chunk
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            f = sam.encode(x)
            sum(v.float().mean() for v in f.vision_feats + f.backbone_fpn).backward()
            best = min(best, time.perf_counter() - t)
        return best

    print(f"SAM2 of {args.preset} ({size} px), forward + backward on {torch.get_num_threads()} CPU threads")
    print(f"{'frames':>6} {'path':>10} {'ms/frame':>9} {'ratio':>6}")
    for n in args.frames:
        x = torch.randn(n, 3, size, size)
        naive = step(x, 0)
        print(f"{n:>6} {'one call':>10} {naive / n * 1000:>9.1f} {1.0:>6.2f}")
        for c in args.chunks:
            t = step(x, c)
            print(f"{n:>6} {f'chunks {c}':>10} {t / n * 1000:>9.1f} {naive / t:>6.2f}")


if __name__ == "__main__":
    main()
