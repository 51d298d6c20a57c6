"""What glamm-shapes' vision tower learns about shape, and what it costs, at several input and patch sizes.

    python bench/vision_grid.py [--steps 1500] [--variants 112/14 224/28 224/14] [--device cuda]

Each variant (``IMAGE_SIZE/PATCH_SIZE`` of the CLIP tower; 112/14 is the preset's 8x8 token grid) builds the
``glamm-shapes`` model from seeded random weights and runs the recipe's vision pretraining stage
(``train/vision_pretrain.py``: batch 32, lr 2e-3, 4000 training images) for the same number of steps; the table
gives the held-out object and patch accuracies of colour, shape and size (200 images the stage never saw) and the
stage's wall time, with the ratio against the first variant measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from groundseg.config import preset_config
    from groundseg.hub import ASSETS, build_model, load_tokenizer
    from groundseg.train.vision_pretrain import pretrain_vision

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--variants", nargs="+", default=["112/14", "224/28", "224/14"])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    tok = load_tokenizer(ASSETS / "shapes-demo")
    rows = []
    for v in args.variants:
        size, patch = (int(t) for t in v.split("/"))
        cfg = preset_config("glamm-shapes")
        cfg.vision.clip = {**cfg.vision.clip, "image_size": size, "patch_size": patch}
        torch.manual_seed(0)
        model = build_model(cfg, tok)
        t0 = time.perf_counter()
        r = pretrain_vision(model, args.steps, batch_size=32, lr=2e-3, images=args.images, held_out=200,
                            device=args.device, log=None)
        rows.append((v, size // patch, r.object_accuracy, r.patch_accuracy, time.perf_counter() - t0))
        print(f"done {v}", flush=True)

    base = rows[0][4]
    print(f"\nvision pretraining, {args.steps} steps of 32 images, device {args.device}")
    print(f"{'variant':>8} {'grid':>6} {'obj colour':>10} {'obj shape':>9} {'obj size':>8} "
          f"{'patch shape':>11} {'seconds':>8} {'ratio':>6}")
    for v, g, obj, patch, sec in rows:
        print(f"{v:>8} {f'{g}x{g}':>6} {obj['colour']:>10.3f} {obj['shape']:>9.3f} {obj['size']:>8.3f} "
              f"{patch['shape']:>11.3f} {sec:>8.0f} {sec / base:>6.2f}")


if __name__ == "__main__":
    main()
