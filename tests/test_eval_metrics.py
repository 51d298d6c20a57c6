"""IoUMeter against an independent re-implementation of LISA's metric (``intersectionAndUnionGPU`` in
utils/utils.py and the accumulation in train_ds.py ``validate``), written from its description in
../shared/reference/lisa.md §5.1: torch.histc over the two classes, 255 as ignore_index, ``iou = I / (U + 1e-5)``
with ``iou[U == 0] += 1``, cIoU = ΣI / (ΣU + 1e-10) and gIoU = the mean per-mask IoU, both of the foreground
class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groundseg.eval.metrics import IoUMeter, mask_iou_terms


def lisa_intersection_and_union(pred: torch.Tensor, gt: torch.Tensor, k: int = 2, ignore_index: int = 255):
    """Per-class (intersection, union, target area) as LISA computes them, from their definition."""
    pred, gt = pred.flatten().clone(), gt.flatten()
    pred[gt == ignore_index] = ignore_index
    hit = pred[pred == gt]
    area_i = torch.histc(hit.double(), bins=k, min=0, max=k - 1)
    area_p = torch.histc(pred.double(), bins=k, min=0, max=k - 1)
    area_t = torch.histc(gt.double(), bins=k, min=0, max=k - 1)
    return area_i, area_p + area_t - area_i, area_t


def lisa_scores(pairs) -> tuple[float, float, list[float]]:
    """(cIoU, gIoU, per-mask IoUs) of (pred, gt) pairs, gt in {0, 1, 255}."""
    inter_sum, union_sum, ious = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), []
    for pred, gt in pairs:
        i, u, _ = lisa_intersection_and_union(torch.as_tensor(pred, dtype=torch.int64),
                                              torch.as_tensor(gt, dtype=torch.int64))
        inter_sum += i
        union_sum += u
        iou = i / (u + 1e-5)
        iou[u == 0] += 1.0
        ious.append(float(iou[1]))
    return float(inter_sum[1] / (union_sum[1] + 1e-10)), sum(ious) / len(ious), ious


def _ours(pairs) -> tuple[dict, list[float]]:
    meter = IoUMeter()
    ious = [meter.add(p.astype(bool), g == 1, ignore=g == 255) for p, g in pairs]
    return meter.summary()["all"], ious


def _box(h, w, y0, y1, x0, x1, value=1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def hand_made_pairs():
    h, w = 12, 16
    empty = np.zeros((h, w), np.uint8)
    gt_ignore = _box(h, w, 2, 8, 2, 8)
    gt_ignore[0:4, 10:16] = 255            # an ignore region the prediction spills into
    pred_spill = _box(h, w, 3, 8, 2, 9)
    pred_spill[0:3, 11:16] = 1
    return [
        (_box(h, w, 0, 4, 0, 4), _box(h, w, 0, 4, 0, 6)),      # partial overlap, I=16, U=24
        (empty, empty),                                       # empty / empty: IoU 1, adds nothing to cIoU
        (_box(h, w, 0, 3, 0, 3), _box(h, w, 6, 9, 6, 9)),      # a miss: IoU 0
        (empty, _box(h, w, 5, 7, 5, 7)),                       # nothing predicted: IoU 0
        (_box(h, w, 5, 7, 5, 7), empty),                       # something predicted for an empty target: IoU 0
        (pred_spill, gt_ignore),                               # 255 pixels count in neither term
        (np.ones((h, w), np.uint8), np.full((h, w), 255, np.uint8)),  # all ignored: IoU 1 (U == 0)
        (_box(h, w, 1, 11, 1, 15), _box(h, w, 1, 11, 1, 15)),  # exact
    ]


def test_matches_lisa_on_hand_made_masks():
    pairs = hand_made_pairs()
    ours, our_ious = _ours(pairs)
    c, g, lisa_ious = lisa_scores(pairs)
    assert our_ious == pytest.approx(lisa_ious, abs=1e-5)
    assert ours["cIoU"] == pytest.approx(c, rel=1e-8)
    assert ours["gIoU"] == pytest.approx(g, abs=1e-5)
    # and the hand-computed values themselves
    assert our_ious[:5] == [16 / 24, 1.0, 0.0, 0.0, 0.0]
    assert our_ious[6:] == [1.0, 1.0]
    # pred_spill vs gt_ignore outside the ignore region: I = 5*6 = 30, U = 36 (gt) + 5 (pred column x=8) = 41
    assert our_ious[5] == pytest.approx(30 / 41)
    assert mask_iou_terms(pairs[5][0], pairs[5][1] == 1, pairs[5][1] == 255) == (30, 41)


def test_all_miss_and_all_empty_splits():
    h, w = 8, 8
    miss = [(_box(h, w, 0, 2, 0, 2), _box(h, w, 4, 6, 4, 6)), (np.zeros((h, w), np.uint8), _box(h, w, 0, 8, 0, 8))]
    ours, _ = _ours(miss)
    c, g, _ = lisa_scores(miss)
    assert ours["cIoU"] == c == 0.0 and ours["gIoU"] == g == 0.0 and ours["Prec@0.5"] == 0.0
    empty = [(np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8))] * 3
    ours, _ = _ours(empty)
    c, g, _ = lisa_scores(empty)
    assert ours["gIoU"] == 1.0 and g == pytest.approx(1.0)
    assert c == 0.0 and np.isnan(ours["cIoU"])  # 0/0: LISA's epsilon makes it 0, we report "undefined"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_lisa_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(20):
        h, w = rng.integers(5, 40, size=2)
        pred = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        gt = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        pairs.append((pred, gt))
    ours, our_ious = _ours(pairs)
    c, g, lisa_ious = lisa_scores(pairs)
    assert our_ious == pytest.approx(lisa_ious, abs=1e-5)
    assert ours["cIoU"] == pytest.approx(c, rel=1e-8) and ours["gIoU"] == pytest.approx(g, abs=1e-5)


def test_precision_thresholds_count_iou_at_least_x_and_merge_is_order_free():
    a, b = IoUMeter(), IoUMeter()
    terms = [(5, 10, "x"), (7, 10, "y"), (9, 10, "x"), (0, 4, None), (0, 0, "y")]
    for i, u, g in terms[:2]:
        a.add_terms(i, u, g)
    for i, u, g in terms[2:]:
        b.add_terms(i, u, g)
    b.merge(a)
    one = IoUMeter()
    for i, u, g in reversed(terms):
        one.add_terms(i, u, g)
    assert b.summary() == one.summary()
    s = one.summary()["all"]
    assert s["Prec@0.5"] == 4 / 5 and s["Prec@0.7"] == 3 / 5 and s["Prec@0.9"] == 2 / 5  # IoU 0.5 counts at 0.5
    assert s["cIoU"] == 21 / 34 and s["gIoU"] == pytest.approx((0.5 + 0.7 + 0.9 + 0 + 1) / 5)
