"""What a GLaMM model's region vectors say about their boxes: held-out linear-probe accuracy of colour and shape.

    python bench/region_probe.py MODEL [--images 300] [--seed 7]

For every object of ``--images`` shapes-world images (seed ``--seed``, which the training recipes do not use), the
model's own tensors are collected: the region vector of the object's box (what replaces ``<bbox>``), its
``flatten_linear`` output before the box MLP is added, the RoI-pooled fused maps averaged over levels and cells,
and the mean of the image tokens and of the tower's last level over the object's patches. A logistic regression
per tensor and attribute is fitted on the first 70% of objects and scored on the rest (chance: 1/6). The same
model with its region encoder replaced by a freshly initialised one (seeded) gives the second table: what the
encoder's architecture keeps of the tower's features before any training. Not a speed claim: it prints accuracies
and the mean length of the pooled and box-MLP vectors.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def collect(model, images: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[float, float]]:
    from groundseg.datasets.shapes import COLORS, SHAPES, ShapesWorld
    from groundseg.train.vision_pretrain import shapes_patch_labels

    world = ShapesWorld(seed=seed)
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in ("region vector", "pooled", "RoI mean", "image tokens",
                                                            "tower last level")}
    labels, norms = [], []
    with torch.no_grad():
        for i in range(images):
            s = world.image(i)
            tokens, levels = model.vlm.encode_images_with_levels(model.clip_preprocess(s.image)[None],
                                                                 model.region_levels)
            h, w = s.image.shape[:2]
            boxes = torch.tensor([o.box for o in s.objects], dtype=torch.float32) / torch.tensor([w, h, w, h])
            out = model.encode_regions(levels, [boxes])
            norms.append((out.pooled.norm(dim=1).mean().item(), out.pos.norm(dim=1).mean().item()))
            g = int(round(tokens.shape[1] ** 0.5))
            ids = torch.from_numpy(shapes_patch_labels(s, g)[3].reshape(-1))  # object id at each patch centre
            side = min(h, w)  # the tower sees the centre square (shapes images are square)
            for k, o in enumerate(s.objects):
                cells = ids == o.id
                if not cells.any():  # an object between patch centres: the patch under its centre
                    cells = torch.zeros(g * g, dtype=torch.bool)
                    cells[min(g - 1, int(o.center[1] * g / side)) * g + min(g - 1, int(o.center[0] * g / side))] = True
                feats["region vector"].append(out.features[0][k])
                feats["pooled"].append(out.pooled[k])
                feats["RoI mean"].append(out.roi_feats[:, k].mean((0, 2, 3)))
                feats["image tokens"].append(tokens[0][cells].mean(0))
                feats["tower last level"].append(levels[-1][0][cells].mean(0))
                labels.append((list(COLORS).index(o.color), list(SHAPES).index(o.shape)))
    return ({k: torch.stack(v).float() for k, v in feats.items()}, torch.tensor(labels),
            tuple(np.mean(norms, 0).tolist()))


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> float:
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(500):
        opt.zero_grad()
        F.cross_entropy(lin(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(x[~train]).argmax(1) == y[~train]).float().mean())


def main() -> None:
    from groundseg.grounding.region import RegionEncoder
    from groundseg.hub import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    model = load_model(args.model).eval()
    if not hasattr(model, "encode_regions"):
        raise SystemExit(f"groundseg: error: {args.model} has no region encoder (a GLaMM model is expected)")
    trained = model.region_encoder
    torch.manual_seed(0)
    fresh = RegionEncoder(model.config.region).to(trained.dtype).eval()
    for name, enc in (("trained region encoder", trained), ("freshly initialised region encoder", fresh)):
        model.region_encoder = enc
        feats, y, (pooled, pos) = collect(model, args.images, args.seed)
        train = torch.arange(len(y)) < int(0.7 * len(y))
        print(f"\n{name} ({args.model}; {int((~train).sum())} held-out objects; mean length: pooled "
              f"{pooled:.1f}, box MLP {pos:.1f})")
        print(f"{'tensor':>18} {'colour':>7} {'shape':>7}")
        for k, x in feats.items():
            print(f"{k:>18} {probe(x, y[:, 0], train):>7.3f} {probe(x, y[:, 1], train):>7.3f}")
    model.region_encoder = trained


if __name__ == "__main__":
    main()
