"""Vision pretraining on the shapes world: the first stage of a from-scratch shapes recipe.

LISA, GLaMM and Sa2VA start from a vision tower that already knows what things look like (CLIP, InternViT). Our
from-scratch presets start from random weights, and a vision transformer learns *shape* slowly: inside the full
model, through the language and mask losses alone, the 3-layer CLIP of ``shapes-demo`` could not tell a circle from
a star (a linear probe on its patches scored near chance), so the LLM could not name what it saw.

The same holds for the from-scratch SAM2 of ``sa2va-shapes``: its image features learnt colour and size inside the
full model but not shape (a probe read shape right on 28% of object pixels), and its mask decoder could not tell
"the star" from "the hexagon". For Sa2VA models the stage trains SAM2's image encoder instead of a CLIP tower.

This stage gives the tower what pretraining gives the real ones, cheaply and before anything else is trained: the
tower alone, on shapes-world images of the run's training seed, with a throw-away linear head and two losses,

* per patch: cross-entropy of the colour, shape and size class of the object under the patch centre (0 =
  background), on the states the projector reads (``select_layer``), layer-normalised;
* per object (weighted :data:`OBJECT_WEIGHT`): the same three cross-entropies on the *mean* logits of the
  object's patches -- the loss that teaches shape, since one patch rarely sees a whole object, but the patches
  of an object together do.

Images are generated once (``images`` of them, at the tower's resolution) and revisited, so the stage costs
the tower's forward and backward only. The head is dropped afterwards; the tower keeps what it learnt and the
main run starts from it. :func:`pretrain_vision` returns the held-out accuracies it reached, which a run writes to
``vision_pretrain.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write

CLASSES = (7, 7, 3)  # colour, shape, size; 0 = background (datasets.shapes: 6 colours, 6 shapes, 2 sizes)
# Weight of the per-object loss against the per-patch one. At 3 the tower's held-out object-level shape accuracy
# rose faster than at 1 (0.71 vs 0.59 after 1250 steps of 32 images at 112 px, lr 2e-3 vs 1e-3).
OBJECT_WEIGHT = 3.0
# With region_weight, the region encoder sees the boxes of this many of the images of every REGION_EVERY-th step.
# On 2 CPU cores its part of a step costs about what the tower's 32 images do (glamm-shapes: 0.19 s a step with
# the boxes of 8 images, 0.09 s without; 4 images were hardly cheaper), hence not every step.
REGION_IMAGES = 4
REGION_EVERY = 2


@dataclass
class VisionPretrainResult:
    steps: int
    seconds: float
    final_loss: float
    patch_accuracy: dict[str, float]  # on object patches of held-out images
    object_accuracy: dict[str, float]  # pooled over each object's patches
    position_accuracy: dict[str, float] | None = None  # row/column of every held-out patch (position_weight > 0)
    # GLaMM, region_weight > 0: share of held-out boxes whose region vector is nearest (of the 72 full names'
    # embeddings) to its own object's name
    region_name_accuracy: float | None = None

    def to_dict(self) -> dict:
        d = dict(steps=self.steps, seconds=round(self.seconds, 1), final_loss=round(self.final_loss, 4),
                 patch_accuracy=self.patch_accuracy, object_accuracy=self.object_accuracy)
        if self.region_name_accuracy is not None:
            d["region_name_accuracy"] = self.region_name_accuracy
        if self.position_accuracy is not None:
            d["position_accuracy"] = self.position_accuracy
        return d


@dataclass
class Tower:
    """What the stage trains and how it sees an image: ``module`` (its parameters are trained), ``features``
    (model inputs (B, 3, S, S) -> (B, grid * grid, width) row-major), ``preprocess`` (RGB -> one input) and
    ``crop`` (whether the model sees the centre square of the image, as CLIP does, or the whole image resized to a
    square, as SAM2 does)."""

    module: nn.Module
    features: Callable[[torch.Tensor], torch.Tensor]
    width: int
    grid: int
    preprocess: Callable[[np.ndarray], torch.Tensor]
    crop: bool


def vision_tower(model) -> Tower:
    """The tower a model's stage trains: the CLIP tower of a LISA/GLaMM model (its ``select_layer`` patches), or
    SAM2's image encoder of a Sa2VA model. SAM2's lowest-level features (a 16-pixel grid) are upsampled 4x, to its
    low-resolution mask grid, so that small objects get patches of their own; the mask decoder reads those
    features, and they are what tells one object's shape from another's."""
    if hasattr(model, "vlm"):
        from ..grounding.lisa import clip_preprocess

        vision = model.config.vision
        tower, layer = model.vlm.vision_tower, vision.select_layer
        return Tower(tower, lambda x: tower(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 1:],
                     tower.config.hidden_size, int(round(vision.image_size / int(vision.clip["patch_size"]))),
                     lambda rgb: clip_preprocess(rgb, model.config), crop=True)
    if hasattr(model, "grounding_encoder"):
        from ..config import IMAGENET_MEAN, IMAGENET_STD
        from ..decoders.sam2 import sam2_preprocess
        from ..grounding.sa2va import _feature_map

        sam, size = model.grounding_encoder, model.grounding_encoder.image_size

        def features(x: torch.Tensor) -> torch.Tensor:
            f = _feature_map(sam.encode(x))
            f = F.interpolate(f.float(), size=(size // 4, size // 4), mode="bilinear", align_corners=False)
            return f.flatten(2).transpose(1, 2)

        return Tower(sam.sam2_model.image_encoder, features, sam.sam2_model.hidden_dim, size // 4,
                     lambda rgb: sam2_preprocess(rgb, size, model.config.sam2.resize, IMAGENET_MEAN, IMAGENET_STD),
                     crop=False)
    raise ValueError(f"no vision tower to pretrain in a {type(model).__name__}")


def shapes_patch_labels(item, grid: int, crop: bool = True) -> np.ndarray:
    """(4, grid, grid) int64: colour, shape, size class and object id (0 = background) at each patch centre of the
    tower's view of a shapes-world image (the centre square, see ``train.data.crop_grid_labels``; with
    ``crop=False`` the whole image, see ``train.data.frame_grid_labels``)."""
    from .data import attribute_labels, crop_grid_labels, frame_grid_labels

    amap, _ = attribute_labels(item, [])
    ids = np.zeros((1, *amap.shape[1:]), np.uint8)
    for o in item.objects:  # drawn in id order, so later (upper) objects win, as in the image
        ids[0][o.mask] = o.id
    both = np.concatenate([amap, ids])
    return crop_grid_labels(both, grid) if crop else frame_grid_labels(both, grid)


def make_images(tower: Tower, seed: int, count: int, image_size: int = 256, offset: int = 0,
                each: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` shapes-world images of ``seed`` (indices ``offset...``) as the tower's inputs (float16, to halve
    the cache) and their (4, g, g) patch labels. ``each``, if given, is called with every generated image."""
    from ..datasets.shapes import ShapesWorld

    world = ShapesWorld(seed=seed, image_size=image_size)
    xs, ys = [], []
    for i in range(offset, offset + count):
        item = world.image(i)
        if each is not None:
            each(item)
        xs.append(tower.preprocess(item.image).half())
        ys.append(torch.from_numpy(shapes_patch_labels(item, tower.grid, tower.crop)))
    return torch.stack(xs), torch.stack(ys)


def attribute_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, sum(CLASSES)) patch logits, (B, 4, N) labels (colour, shape, size, object id) -> (patch CE, object CE),
    each summed over the three attributes. The object CE classifies the mean logits of each object's patches."""
    parts = logits.split(CLASSES, dim=-1)
    patch = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]).float(), labels[:, k].reshape(-1))
                for k, p in enumerate(parts))
    pooled, targets = object_logits(logits, labels)
    if not len(pooled):
        return patch, logits.new_zeros(())
    obj = sum(F.cross_entropy(p.float(), targets[:, k]) for k, p in enumerate(pooled.split(CLASSES, dim=-1)))
    return patch, obj


def object_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logits over each (image, object id) group of patches: (M, sum(CLASSES)) and the (M, 3) classes."""
    b, n, c = logits.shape
    ids = labels[:, 3]  # (B, N)
    key = (torch.arange(b, device=ids.device)[:, None] * 256 + ids).reshape(-1)
    fg = ids.reshape(-1) > 0
    key, flat, lab = key[fg], logits.reshape(-1, c)[fg], labels[:, :3].permute(0, 2, 1).reshape(-1, 3)[fg]
    uniq, group = torch.unique(key, return_inverse=True)
    sums = flat.new_zeros(len(uniq), c).index_add_(0, group, flat)
    counts = torch.bincount(group, minlength=len(uniq)).clamp(min=1)
    targets = lab.new_zeros(len(uniq), 3).index_copy_(0, group, lab)  # every patch of a group has its object's classes
    return sums / counts[:, None].to(sums.dtype), targets


class _Head(nn.Module):
    def __init__(self, tower: Tower, position: bool = False):
        super().__init__()
        self.tower, self.features, self.grid = tower.module, tower.features, tower.grid
        self.linear = nn.Linear(tower.width, sum(CLASSES))
        # each patch's row and column, read back linearly (see position_loss)
        self.position = nn.Linear(tower.width, 2 * tower.grid) if position else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(x)[0]

    def heads(self, x: torch.Tensor | None, h: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(attribute logits (B, N, sum(CLASSES)), position logits (B, N, 2 * grid) or None), from the inputs
        ``x`` or from their features ``h`` when already computed."""
        h = self.features(x) if h is None else h
        h = F.layer_norm(h, h.shape[-1:])
        return self.linear(h), (self.position(h) if self.position is not None else None)


def position_loss(logits: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid * grid, 2 * grid) row-major patch logits -> CE of each patch's row plus CE of its column.

    A tower trained from random weights on what-is-where labels alone keeps little of *where*: after glamm-shapes'
    recipe a patch's column was linearly readable 18% of the time on its 8x8 grid (chance 12.5%), though its LLM
    was then asked to list objects from left to right. A pretrained CLIP's patches carry their position; this loss keeps
    ours carrying it."""
    if logits.shape[1] != grid * grid:
        raise ValueError(f"position probe: {logits.shape[1]} image tokens, expected {grid}x{grid}")
    rows, cols = position_targets(grid, logits.device)
    n = len(logits)
    return (F.cross_entropy(logits[..., :grid].float().transpose(1, 2), rows.expand(n, -1))
            + F.cross_entropy(logits[..., grid:].float().transpose(1, 2), cols.expand(n, -1)))


def position_targets(grid: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and the column of each of ``grid * grid`` row-major patches, two (grid * grid,) int64 tensors."""
    idx = torch.arange(grid * grid, device=device)
    return idx // grid, idx % grid


@torch.no_grad()
def _position_accuracy(head: _Head, x: torch.Tensor, batch: int = 64) -> dict[str, float]:
    g, ok, n = head.grid, np.zeros(2), 0
    rows, cols = position_targets(g)
    for i in range(0, len(x), batch):
        pos = head.heads(x[i:i + batch].float())[1].cpu()
        ok += [(pos[..., :g].argmax(-1) == rows).sum().item(), (pos[..., g:].argmax(-1) == cols).sum().item()]
        n += pos.shape[0] * pos.shape[1]
    return {"row": round(float(ok[0] / max(n, 1)), 4), "column": round(float(ok[1] / max(n, 1)), 4)}


@torch.no_grad()
def _accuracy(head: _Head, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> tuple[dict, dict]:
    names = ("colour", "shape", "size")
    patch_ok, patch_n = np.zeros(3), 0
    obj_ok, obj_n = np.zeros(3), 0
    for i in range(0, len(x), batch):
        logits = head(x[i:i + batch].float())
        labels = y[i:i + batch].flatten(2)
        fg = labels[:, 3] > 0
        for k, p in enumerate(logits.split(CLASSES, dim=-1)):
            patch_ok[k] += (p.argmax(-1) == labels[:, k])[fg].sum().item()
        patch_n += int(fg.sum())
        pooled, targets = object_logits(logits, labels)
        for k, p in enumerate(pooled.split(CLASSES, dim=-1)):
            obj_ok[k] += (p.argmax(-1) == targets[:, k]).sum().item()
        obj_n += len(pooled)
    return ({n: round(float(v / max(patch_n, 1)), 4) for n, v in zip(names, patch_ok)},
            {n: round(float(v / max(obj_n, 1)), 4) for n, v in zip(names, obj_ok)})


class _Regions:
    """GLaMM's region encoder in the stage (``region_weight`` > 0): every object's box of every cached image, and
    the token id of its full name (" large red circle"), whose embedding its region vector is pulled to."""

    def __init__(self, model):
        from .probes import name_token_tables

        if not hasattr(model, "encode_regions"):
            raise ValueError("region pretraining needs a model with a region encoder (GLaMM)")
        _, self.full = name_token_tables(model.tokenizer)
        self.model = model
        self.boxes: list[torch.Tensor] = []  # per cached image, in cache order (see add)
        self.names: list[torch.Tensor] = []

    def add(self, item) -> None:
        """Record a cached image's boxes (normalised xyxy) and their objects' name ids (``make_images``' ``each``)."""
        from ..datasets.shapes import COLORS, SHAPES, SIZES

        h, w = item.image.shape[:2]
        self.boxes.append(torch.tensor([o.box for o in item.objects], dtype=torch.float32)
                          / torch.tensor([w, h, w, h], dtype=torch.float32))
        self.names.append(torch.tensor([int(self.full[list(SIZES).index(o.size) + 1, list(COLORS).index(o.color) + 1,
                                                      SHAPES.index(o.shape) + 1]) for o in item.objects]))

    def embeddings(self) -> torch.Tensor:
        return self.model.vlm.language_model.get_input_embeddings().weight.detach()

    def tower_pass(self, x: torch.Tensor, select_layer: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One tower pass: the stage head's features and the region encoder's CLIP levels."""
        out = self.model.vlm.vision_tower(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[select_layer][:, 1:], [out.hidden_states[i][:, 1:] for i in self.model.region_levels]

    def vectors(self, levels: list[torch.Tensor], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = levels[0].device
        enc = self.model.region_encoder
        feats = enc([lv.to(enc.dtype) for lv in levels], [self.boxes[i].to(device) for i in idx]).features
        return torch.cat(feats), torch.cat([self.names[i] for i in idx]).to(device)

    def loss(self, levels: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
        from .probes import name_alignment_loss

        vec, ids = self.vectors(levels, idx)
        return name_alignment_loss(vec, ids, self.embeddings().to(vec.device))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, offset: int, select_layer: int, batch: int = 64) -> float:
        """Held-out images ``x`` (cache indices ``offset...``): share of boxes nearest to their own name."""
        emb = self.embeddings()
        names = self.full[self.full >= 0].flatten().to(emb.device)
        table = emb[names].float()
        ok = n = 0
        for i in range(0, len(x), batch):
            _, levels = self.tower_pass(x[i:i + batch].float(), select_layer)
            vec, ids = self.vectors(levels, list(range(offset + i, offset + i + len(levels[0]))))
            nearest = names[torch.cdist(vec.float(), table).argmin(1)]
            ok += int((nearest == ids).sum())
            n += len(ids)
        return round(ok / max(n, 1), 4)


def pretrain_vision(model, steps: int, batch_size: int = 32, lr: float = 1e-3, images: int = 8000, seed: int = 0,
                    image_size: int = 256, held_out: int = 200, device: torch.device | str = "cpu",
                    log=print, position_weight: float = 0.0, region_weight: float = 0.0) -> VisionPretrainResult:
    """Train ``model``'s vision tower in place for ``steps`` steps (see the module doc); returns held-out accuracies
    on ``held_out`` images of the same seed that the stage never trained on. Deterministic for a seed on CPU.
    ``position_weight`` > 0 adds :func:`position_loss` (a third linear head reads each patch's row and column).
    ``region_weight`` > 0 (GLaMM, with one-token object names) trains the region encoder too, on the same tower
    pass: each object's box gives a region vector, pulled to the LLM's embedding of the object's full name
    (``train.probes.name_alignment_loss``), so that the main run's LLM meets region vectors that already read as
    names."""
    spec = vision_tower(model)
    tower = spec.module
    t0 = time.perf_counter()
    regions = _Regions(model) if region_weight > 0 else None
    x, y = make_images(spec, seed, images + held_out, image_size, each=regions.add if regions is not None else None)
    xt, yt = x[images:], y[images:]
    x, y = x[:images], y[:images]
    gen = torch.Generator().manual_seed(seed)
    head = _Head(spec, position=position_weight > 0)
    head.to(device)  # the tower too; accelerate.prepare moves the rest of the model later
    if regions is not None:
        head.regions = model.region_encoder.to(device)  # trained with the head (its parameters join the optimizer)
    if not spec.crop:  # SAM2's encoding also runs its decoder's high-resolution convolutions
        model.grounding_encoder.to(device)
    was_training = tower.training
    tower.train()
    params = [p for p in head.parameters()]
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = min(50, max(1, steps // 10))
    loss_value = float("nan")
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else max(0.05, 1 - (step - warmup) / max(1, steps - warmup))
        for g in optimizer.param_groups:
            g["lr"] = lr * scale
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        if regions is None:
            logits, pos = head.heads(x[idx].to(device).float())
        else:  # the same single tower pass, keeping the region encoder's levels too
            h, levels = regions.tower_pass(x[idx].to(device).float(), model.config.vision.select_layer)
            logits, pos = head.heads(None, h)
        patch, obj = attribute_losses(logits, y[idx].to(device).flatten(2))
        loss = patch + OBJECT_WEIGHT * obj
        if regions is not None and not step % REGION_EVERY:
            k = min(REGION_IMAGES, len(idx))
            loss = loss + region_weight * regions.loss([lv[:k] for lv in levels], idx[:k].tolist())
        if pos is not None:
            loss = loss + position_weight * position_loss(pos, spec.grid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"vision pretraining: step {step + 1}/{steps}, loss {loss_value:.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
    tower.eval()
    patch_acc, obj_acc = _accuracy(head, xt.to(device), yt.to(device)) if held_out else ({}, {})
    pos_acc = _position_accuracy(head, xt.to(device)) if held_out and position_weight > 0 else None
    region_acc = None
    if regions is not None:
        enc_was = model.region_encoder.training
        model.region_encoder.eval()
        region_acc = regions.accuracy(xt.to(device), images, model.config.vision.select_layer) if held_out else None
        model.region_encoder.train(enc_was)
        del head.regions  # the encoder stays in the model; only the head is thrown away
    for p, r in zip(params, requires):
        p.requires_grad_(r)
    tower.train(was_training)
    result = VisionPretrainResult(steps, time.perf_counter() - t0, loss_value, patch_acc, obj_acc, pos_acc,
                                  region_acc)
    if log:
        log(f"vision pretraining: done in {result.seconds:.0f} s; held-out object accuracy {obj_acc}"
            + (f", patch position accuracy {pos_acc}" if pos_acc else "")
            + (f", region name accuracy {region_acc}" if region_acc is not None else ""))
    return result


def probe_tower(model, images: int = 3000, held_out: int = 200, steps: int = 600, seed: int = 0,
                image_size: int = 256) -> tuple[dict[str, float], dict[str, float]]:
    """How much a model's (frozen) vision tower knows about the shapes world: a linear head fitted with the stage's
    losses on ``images`` images of ``seed``, scored on ``held_out`` more. Returns (patch, object) accuracies; the
    tower is not changed."""
    spec = vision_tower(model)
    tower = spec.module
    x, y = make_images(spec, seed, images + held_out, image_size)
    head = _Head(spec)
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        feats = torch.cat([spec.features(x[i:i + 100].float()) for i in range(0, images, 100)])
    optimizer = torch.optim.Adam(head.linear.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(images, (64,), generator=gen)
        logits = head.linear(F.layer_norm(feats[idx], feats.shape[-1:]))
        patch, obj = attribute_losses(logits, y[idx].flatten(2))
        optimizer.zero_grad(set_to_none=True)
        (patch + OBJECT_WEIGHT * obj).backward()
        optimizer.step()
    acc = _accuracy(head, x[images:], y[images:])
    tower.train(was_training)
    return acc


def main(argv: list[str] | None = None) -> None:
    """``python -m groundseg.train.vision_pretrain MODEL``: :func:`probe_tower`'s accuracies as JSON."""
    import sys

    from ..hub import load_model

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m groundseg.train.vision_pretrain MODEL")
    torch.manual_seed(0)
    patch, obj = probe_tower(load_model(args[0]))
    print(json.dumps({"model": args[0], "patch_accuracy": patch, "object_accuracy": obj}))


def write_result(result: VisionPretrainResult, path: Path) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(result.to_dict(), indent=2) + "\n")


__all__ = ["pretrain_vision", "probe_tower", "vision_tower", "Tower", "attribute_losses", "object_logits",
           "position_loss", "position_targets", "shapes_patch_labels", "VisionPretrainResult", "write_result"]

if __name__ == "__main__":
    main()
