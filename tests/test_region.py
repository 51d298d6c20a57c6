"""The RoIAlign region encoder (grounding/region.py): shapes, box scaling against hand-computed crops, and the
in-order ``<bbox>`` replacement with its errors."""

from __future__ import annotations

import pytest
import torch

from groundseg.config import RegionConfig
from groundseg.grounding.region import (RegionCountError, RegionEncoder, normalise_boxes, pool_rois,
                                        region_layer_indices, replace_bbox_embeddings)

TINY = RegionConfig(embed_dims=64, pos_hidden=8, query_dims=16, out_dims=48)


def test_layer_indices():
    assert region_layer_indices(24) == [14, 17, 20, 23]  # CLIP-L: reference/glamm.md §1.5
    assert region_layer_indices(11) == [1, 4, 7, 10]  # the tiny parity CLIP
    with pytest.raises(ValueError, match="too few layers"):
        region_layer_indices(6)


def test_output_shapes_and_box_order():
    torch.manual_seed(0)
    enc = RegionEncoder(TINY).eval()
    levels = [torch.randn(2, 576, 64) for _ in range(4)]
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]]),
             torch.tensor([[0.2, 0.3, 0.4, 0.5]])]
    with torch.no_grad():
        out = enc(levels, boxes)
        assert [tuple(f.shape) for f in out.features] == [(3, 48), (1, 48)]
        assert tuple(out.roi_feats.shape) == (4, 4, 64, 14, 14)
        assert [tuple(f.shape[-2:]) for f in out.fused] == [(192, 192), (96, 96), (48, 48), (24, 24)]
        assert out.rois[:, 0].tolist() == [0, 0, 0, 1]
        # each box's vector depends on its own box only: reversing the boxes reverses the vectors
        rev = enc(levels, [boxes[0].flip(0), boxes[1]])
    assert torch.allclose(rev.features[0], out.features[0].flip(0), atol=1e-5)
    assert not torch.allclose(out.features[0][0], out.features[0][1])
    with pytest.raises(ValueError, match=r"\(B, 576, 64\)"):
        enc([torch.randn(1, 100, 64)] * 4, [boxes[1]])


def ramp(size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    return (x + 1000 * y)[None, None]


def test_roi_align_scaling_against_hand_computed_crops():
    """On a linear ramp f(x, y) = x + 1000 y every bilinear sample is exact, so each 14x14 bin holds the value at
    its centre. A box edge at normalised u lands at u * scale / stride - 0.5 on level l's map (aligned=True);
    GLaMM's scale is 224, the maps (192/96/48/24 at strides 1.75/3.5/7/14) span 336."""
    levels = [ramp(s) for s in (192, 96, 48, 24)]
    box = torch.tensor([[0.25, 0.125, 0.75, 0.5]])
    centres = torch.arange(14) + 0.5
    for scale, span in ((224.0, 224.0), (None, 336.0)):  # GLaMM's x224 quirk vs the span of the maps
        cfg = RegionConfig(embed_dims=1, roi_box_scale=scale)
        rois, feats = pool_rois(levels, [box], cfg)
        assert rois[0].tolist() == pytest.approx([0] + (box[0] * span).tolist())
        for lvl, stride in enumerate(cfg.featmap_strides):
            x1, y1, x2, y2 = (box[0] * span / stride).tolist()  # in map cells
            exp_x = x1 - 0.5 + centres * (x2 - x1) / 14
            exp_y = y1 - 0.5 + centres * (y2 - y1) / 14
            assert torch.allclose(feats[lvl, 0, 0], exp_x[None, :] + 1000 * exp_y[:, None], atol=1e-2), (scale, lvl)
    # with x224 a full-image box reaches only two thirds of each map: cell 127.5 of 192 on the finest level
    _, feats = pool_rois(levels, [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], RegionConfig(embed_dims=1))
    assert feats[0, 0, 0, -1, -1].item() == pytest.approx(127.5 - 128 / 28 + 1000 * (127.5 - 128 / 28), abs=1e-2)


def test_normalise_boxes_by_original_size():
    t = normalise_boxes([[10, 12, 50, 42]], (48, 80))
    assert t.tolist() == [[10 / 80, 12 / 48, 50 / 80, 42 / 48]]


def test_bbox_replacement_in_order_and_errors():
    bbox = 7
    ids = torch.tensor([[1, 7, 3, 7, 0], [1, 2, 3, 4, 0]])
    embeds = torch.zeros(2, 5, 3)
    feats = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    out = replace_bbox_embeddings(embeds, ids, bbox, [feats, None])
    assert out[0, 1].tolist() == [0, 1, 2] and out[0, 3].tolist() == [3, 4, 5]
    assert out[0, [0, 2, 4]].abs().sum() == 0 and out[1].abs().sum() == 0
    assert embeds.abs().sum() == 0  # the input is left alone
    out.sum().backward()
    assert feats.grad.tolist() == [[1, 1, 1], [1, 1, 1]]
    with pytest.raises(RegionCountError, match="prompt 0 has 2 <bbox> placeholder\\(s\\) but 1 box"):
        replace_bbox_embeddings(embeds, ids, bbox, [feats[:1], None])
    with pytest.raises(RegionCountError, match="prompt 1 has 0 <bbox> placeholder\\(s\\) but 2 box"):
        replace_bbox_embeddings(embeds, ids, bbox, [feats, feats])
    with pytest.raises(RegionCountError, match="prompt 0 has 2 <bbox>.* but 0 box"):
        replace_bbox_embeddings(embeds, ids, bbox, [None, None])
    # a row without <bbox> and without boxes keeps its embeddings
    row = torch.randn(1, 5, 3)
    assert torch.equal(replace_bbox_embeddings(row, torch.tensor([[1, 2, 3, 4, 0]]), bbox, [None]), row)
