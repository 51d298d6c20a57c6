"""Region prompts: boxes -> one LLM-width vector each, through RoIAlign on multi-level CLIP features (GLaMM).

GLaMM's region encoder (adapted from GPT4RoI; reference/glamm.md §1.5), built here on
``torchvision.ops.roi_align(aligned=True)``:

1. ``L`` CLIP hidden states (layers 14/17/20/23 of CLIP-L for the official model, see :func:`region_layer_indices`),
   CLS dropped, as (B, C, g, g) maps (g = 24);
2. level ``l`` is upsampled (bilinear, ``align_corners=True``) to ``g * 2**(L-1-l)`` -- the shallowest layer to the
   finest map (192/96/48/24);
3. :class:`MultiLevelFuse`: x/y coordinate channels and a 1x1 conv per level, then ``num_fuse`` rounds in which
   every level keeps its first half of channels and borrows a quarter from the next coarser and the next finer
   level (resized to its own size) before a shared 3x3 conv + GroupNorm + ReLU;
4. :class:`RoIHead`: a 14x14 RoIAlign per level (``spatial_scale = 1 / stride``), a 3x3 conv per level, summed,
   ReLU, flattened, a linear layer; plus an MLP embedding of the normalised box; then a linear map to the LLM width.

Boxes come in normalised to the ORIGINAL image, ``(x1/W, y1/H, x2/W, y2/H)``. Before RoIAlign they are scaled by
``RegionConfig.roi_box_scale``. GLaMM's weights were trained with 224 on a 336-pixel CLIP (a GPT4RoI leftover):
a box then covers only the top-left two thirds of each feature map in feature coordinates. 224 is therefore the
default and must stay for the official weights; ``roi_box_scale=None`` scales by the span the feature maps
actually cover (``g * featmap_strides[-1]``), the geometrically faithful choice for models trained from scratch.

Parameter names match the official checkpoint below ``model.region_encoder.`` (``mlvl_fuse.input_conv.*``,
``mlvl_fuse.fuse_convs.{r}.conv/gn``, ``roi_align.pconvs.*``, ``roi_align.pos_embedd.*``,
``roi_align.flatten_linear``, ``roi_align.updims``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align as tv_roi_align

from ..config import RegionConfig

GPT4ROI_BOX_SCALE = 224.0
"""The box scale GLaMM's released weights were trained with (reference/glamm.md §1.5)."""

__all__ = ["RegionConfig", "RegionEncoder", "RegionOutput", "RegionCountError", "region_layer_indices",
           "normalise_boxes", "pool_rois", "replace_bbox_embeddings", "GPT4ROI_BOX_SCALE"]


def region_layer_indices(num_hidden_layers: int, select_layer: int = -2, num_levels: int = 4) -> list[int]:
    """Indices into CLIP's ``hidden_states`` (``num_hidden_layers + 1`` entries, 0 = embeddings) that feed the
    region encoder: every third state counting down from ``select_layer``, the last ``num_levels`` of them in
    increasing order (CLIP-L, 24 layers: 14, 17, 20, 23)."""
    n = num_hidden_layers + 1
    picked = list(range(n))[select_layer::-3][::-1][-num_levels:]
    if len(picked) < num_levels:
        raise ValueError(f"a {num_hidden_layers}-layer vision tower has too few layers for {num_levels} region "
                         "levels")
    return picked


class ConvGNReLU(nn.Sequential):
    """3x3 conv (no bias) -> GroupNorm -> ReLU; children named ``conv``/``gn`` as mmcv's ConvModule."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, channels)
        self.act = nn.ReLU(inplace=True)


def _coords(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): x then y, each ``linspace(-1, 1)`` along its axis."""
    ys = torch.linspace(-1, 1, h, device=like.device)
    xs = torch.linspace(-1, 1, w, device=like.device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y])[None].expand(b, -1, -1, -1).to(like.dtype)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, corners aligned, computed in float32 and cast back."""
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True).to(x.dtype)


class MultiLevelFuse(nn.Module):
    """Coordinate channels + per-level 1x1 conv, then rounds of cross-level channel exchange and 3x3 convs."""

    def __init__(self, cfg: RegionConfig):
        super().__init__()
        c = cfg.embed_dims
        self.quarter = c // 4
        self.keep = c - 2 * self.quarter
        self.num_levels = cfg.num_levels
        self.input_conv = nn.ModuleList(nn.Conv2d(c + 2, c, 1) for _ in range(cfg.num_levels))
        self.fuse_convs = nn.ModuleList(ConvGNReLU(c, cfg.gn_groups) for _ in range(cfg.num_fuse))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """``levels``: (B, C, h_l, w_l) per level, finest first -> the same shapes, fused."""
        x = [conv(torch.cat([f, _coords(f.shape[0], f.shape[2], f.shape[3], f)], 1))
             for conv, f in zip(self.input_conv, levels)]
        last = self.num_levels - 1
        for conv in self.fuse_convs:
            mixed = []
            for lvl, f in enumerate(x):
                coarser, finer = x[min(lvl + 1, last)], x[max(lvl - 1, 0)]
                size = f.shape[-2:]
                mixed.append(torch.cat([f[:, :self.keep],
                                        _resize(coarser[:, self.keep + self.quarter:], size),
                                        _resize(finer[:, self.keep:self.keep + self.quarter], size)], 1))
            x = [conv(m) for m in mixed]
        return x


class RoIHead(nn.Module):
    """Per-level RoIAlign -> per-level 3x3 conv, summed -> ReLU -> flatten -> linear; + box MLP; -> LLM width."""

    def __init__(self, cfg: RegionConfig):
        super().__init__()
        c = cfg.embed_dims
        self.cfg = cfg
        self.pconvs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(cfg.num_levels))
        self.pos_embedd = nn.Sequential(
            nn.Linear(4, cfg.pos_hidden), nn.ReLU(inplace=True), nn.LayerNorm(cfg.pos_hidden),
            nn.Linear(cfg.pos_hidden, cfg.query_dims), nn.ReLU(inplace=True), nn.LayerNorm(cfg.query_dims))
        self.flatten_linear = nn.Linear(c * cfg.roi_size ** 2, cfg.query_dims)
        self.updims = nn.Linear(cfg.query_dims, cfg.out_dims)


@dataclass
class RegionOutput:
    """What the region encoder computed. ``features``: one (n_i, out_dims) tensor per image, box order.
    Intermediates (all boxes of the batch stacked): ``rois`` (n, 5) ``[image, x1, y1, x2, y2]`` in RoI units;
    ``roi_feats`` (L, n, C, r, r); ``pooled`` (n, query_dims) after ``flatten_linear``; ``pos`` (n, query_dims);
    ``fused`` the fused level maps."""

    features: list[torch.Tensor]
    rois: torch.Tensor
    roi_feats: torch.Tensor
    pooled: torch.Tensor
    pos: torch.Tensor
    fused: list[torch.Tensor] = field(default_factory=list)


def pool_rois(levels: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], cfg: RegionConfig
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIAlign of every box on every level.

    Args:
        levels: (B, C, h_l, w_l) maps, level ``l`` with stride ``cfg.featmap_strides[l]``.
        boxes: B tensors (n_i, 4) of normalised xyxy boxes.
    Returns:
        ``rois`` (n, 5) ``[image, x1, y1, x2, y2]`` = normalised box x ``cfg.box_scale``, and the pooled features
        (L, n, C, r, r) (computed in float32, returned in the levels' dtype). ``aligned=True``: a RoI edge at
        ``x`` samples the map at ``x / stride - 0.5``, pixel centres sitting at integer + 0.5.
    """
    device = levels[0].device
    flat = torch.cat([bx.reshape(-1, 4) for bx in boxes]).to(device)
    counts = torch.tensor([len(bx) for bx in boxes], device=device)
    image_idx = torch.repeat_interleave(torch.arange(len(boxes), device=device), counts)
    rois = torch.cat([image_idx[:, None].float(), flat.float() * cfg.box_scale], 1)
    feats = torch.stack([
        tv_roi_align(f.float(), rois, output_size=cfg.roi_size, spatial_scale=1.0 / stride,
                     sampling_ratio=cfg.sampling_ratio, aligned=True).to(f.dtype)
        for f, stride in zip(levels, cfg.featmap_strides)])
    return rois, feats


class RegionEncoder(nn.Module):
    """Boxes + multi-level CLIP features -> one vector per box (see the module docstring)."""

    def __init__(self, cfg: RegionConfig):
        super().__init__()
        self.cfg = cfg
        self.mlvl_fuse = MultiLevelFuse(cfg)
        self.roi_align = RoIHead(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.roi_align.flatten_linear.weight.dtype

    def forward(self, level_feats: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> RegionOutput:
        """
        Args:
            level_feats: ``num_levels`` tensors (B, g*g, C) of CLIP patch states (CLS dropped), shallowest first.
            boxes: B tensors (n_i, 4), normalised xyxy in [0, 1] w.r.t. each original image.
        Returns:
            :class:`RegionOutput`; ``features[i]`` is (n_i, out_dims).
        """
        cfg = self.cfg
        if len(level_feats) != cfg.num_levels:
            raise ValueError(f"region encoder expects {cfg.num_levels} feature levels, got {len(level_feats)}")
        b, n_tok, c = level_feats[0].shape
        if n_tok != cfg.grid ** 2 or c != cfg.embed_dims:
            raise ValueError(f"region features must be (B, {cfg.grid ** 2}, {cfg.embed_dims}), got "
                             f"{tuple(level_feats[0].shape)}")
        if len(boxes) != b:
            raise ValueError(f"{len(boxes)} box lists for {b} images")
        dtype = self.dtype
        maps = [f.transpose(1, 2).reshape(b, c, cfg.grid, cfg.grid) for f in level_feats]
        maps = [_resize(m.float(), (s, s)).to(dtype) for m, s in zip(maps, cfg.map_sizes)]
        fused = self.mlvl_fuse(maps)

        head = self.roi_align
        flat_boxes = torch.cat([bx.reshape(-1, 4) for bx in boxes]).to(fused[0].device)
        counts = [len(bx) for bx in boxes]
        rois, roi_feats = pool_rois(fused, boxes, cfg)
        summed = sum(conv(r) for conv, r in zip(head.pconvs, roi_feats))
        pooled = head.flatten_linear(F.relu(summed).flatten(1))
        pos = head.pos_embedd(flat_boxes.to(dtype))
        out = head.updims(pooled + pos)
        return RegionOutput(list(out.split(counts)), rois, roi_feats, pooled, pos, fused)


def normalise_boxes(boxes_xyxy: Sequence[Sequence[float]], original_size: tuple[int, int]) -> torch.Tensor:
    """Pixel boxes (n, 4) xyxy on an image of ``original_size`` (h, w) -> (n, 4) float32 in [0, 1], as GLaMM's
    datasets, demo and evaluation normalise them (by the original width and height)."""
    h, w = original_size
    t = torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    return t / torch.tensor([w, h, w, h], dtype=torch.float32)


class RegionCountError(ValueError):
    """The prompt's ``<bbox>`` placeholders and the given boxes differ in number."""


def replace_bbox_embeddings(inputs_embeds: torch.Tensor, token_ids: torch.Tensor, bbox_token_id: int,
                            region_features: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Overwrite, row by row, the embedding at each ``<bbox>`` position with the next region vector, in order.

    Args:
        inputs_embeds: (B, T, H) embedded prompts (image already spliced in).
        token_ids: (B, T) the id at each embedded position.
        bbox_token_id: the ``<bbox>`` id.
        region_features: per row, (n_r, H) vectors in ``<bbox>`` order, or None for a row without boxes.
    Returns:
        A new (B, T, H) tensor (the input is not modified; gradients flow into the region vectors).
    Raises:
        RegionCountError: a row whose number of ``<bbox>`` differs from its number of vectors. (The official code
        silently drops surplus vectors; a mismatch here is always a mistake in the prompt or the boxes.)
    """
    if len(region_features) != inputs_embeds.shape[0]:
        raise RegionCountError(f"{len(region_features)} rows of region features for a batch of "
                               f"{inputs_embeds.shape[0]} prompts")
    out = inputs_embeds
    for r, feats in enumerate(region_features):
        pos = (token_ids[r] == bbox_token_id).nonzero().flatten()
        n = 0 if feats is None else len(feats)
        if len(pos) != n:
            raise RegionCountError(f"prompt {r} has {len(pos)} <bbox> placeholder(s) but {n} box(es) were given; "
                                   "write one <bbox> per box, in box order")
        if n:
            if out is inputs_embeds:
                out = inputs_embeds.clone()
            out[r, pos] = feats.to(out.dtype)
    return out
