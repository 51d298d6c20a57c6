"""Segmentation and grounding metrics, as the field computes them.

* cIoU (cumulative IoU): sum of intersections over sum of unions across every expression of a split.
* gIoU: the mean of per-expression IoUs, where an expression with an empty ground truth and an empty prediction
  scores 1 (LISA's ``iou[union == 0] += 1``; per expression, not per image).
* Prec@X: the fraction of expressions with IoU >= X (X in 0.5 ... 0.9), as LAVT's ``test.py`` counts it (LISA
  reports no Prec@X).
* box Acc@0.5: the fraction of predicted boxes with IoU >= 0.5 against the ground-truth box
  (:class:`BoxMeter`, which also gives the mean box IoU).

Pixels marked ``ignore`` (ReasonSeg's 255) count in neither intersection nor union.

These equal LISA's ``intersectionAndUnionGPU`` (foreground class, ``ignore_index=255``) up to its ``1e-5``/``1e-10``
guards against division by zero (``tests/test_eval_metrics.py`` checks against an independent re-implementation).
Sums are exact (integer pixel counts, :func:`math.fsum` for IoUs), so a report does not depend on the order in which
expressions were added: a resumed or multi-process evaluation gives the same numbers as one uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def mask_iou_terms(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """(H, W) boolean prediction and ground truth -> (intersection, union) pixel counts."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        pred, gt = pred & keep, gt & keep
    return int((pred & gt).sum()), int((pred | gt).sum())


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes (continuous coordinates)."""
    ax1, ay1, ax2, ay2 = map(float, a)
    bx1, by1, bx2, by2 = map(float, b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class IoUMeter:
    """Accumulates cIoU, gIoU and Prec@X over expressions, overall and per group (e.g. expression kind)."""

    inter: dict[str, int] = field(default_factory=dict)
    union: dict[str, int] = field(default_factory=dict)
    ious: dict[str, list[float]] = field(default_factory=dict)

    def add(self, pred: np.ndarray, gt: np.ndarray, group: str | None = None,
            ignore: np.ndarray | None = None) -> float:
        """Add one expression; returns its IoU (1.0 when both masks are empty)."""
        return self.add_terms(*mask_iou_terms(pred, gt, ignore), group=group)

    def add_terms(self, i: int, u: int, group: str | None = None) -> float:
        """Add one expression from its (intersection, union) pixel counts; returns its IoU."""
        iou = i / u if u > 0 else 1.0
        for g in ("all",) + ((group,) if group else ()):
            self.inter[g] = self.inter.get(g, 0) + i
            self.union[g] = self.union.get(g, 0) + u
            self.ious.setdefault(g, []).append(iou)
        return iou

    def merge(self, other: "IoUMeter") -> None:
        """Add every expression of ``other`` (e.g. another process's shard)."""
        for g in other.ious:
            self.inter[g] = self.inter.get(g, 0) + other.inter[g]
            self.union[g] = self.union.get(g, 0) + other.union[g]
            self.ious.setdefault(g, []).extend(other.ious[g])

    def summary(self) -> dict[str, dict[str, float]]:
        """{group: {"cIoU", "gIoU", "Prec@0.5", ..., "n"}}, "all" first."""
        out = {}
        for g in ["all"] + sorted(k for k in self.ious if k != "all"):
            ious = self.ious.get(g, [])
            n = len(ious)
            row = {"cIoU": self.inter.get(g, 0) / self.union[g] if self.union.get(g) else float("nan"),
                   "gIoU": math.fsum(ious) / n if n else float("nan")}
            for t in PREC_THRESHOLDS:
                row[f"Prec@{t}"] = sum(v >= t for v in ious) / n if n else float("nan")
            row["n"] = int(len(ious))
            out[g] = row
        return out


@dataclass
class BoxMeter:
    """Accumulates box Acc@0.5 (IoU >= 0.5) and mean IoU over expressions, overall and per group (e.g. expression
    kind); a missing prediction (None) scores IoU 0."""

    ious: dict[str, list[float]] = field(default_factory=dict)

    def add(self, pred, gt, group: str | None = None) -> float:
        """Add one expression (xyxy boxes; ``pred`` None when there is no box); returns its IoU."""
        iou = box_iou(pred, gt) if pred is not None else 0.0
        for g in ("all",) + ((group,) if group else ()):
            self.ious.setdefault(g, []).append(iou)
        return iou

    def merge(self, other: "BoxMeter") -> None:
        """Add every expression of ``other`` (e.g. another process's shard)."""
        for g, ious in other.ious.items():
            self.ious.setdefault(g, []).extend(ious)

    def summary(self) -> dict[str, dict[str, float]]:
        """{group: {"Acc@0.5", "mIoU", "n"}}, "all" first (NaN metrics for a group without expressions)."""
        out = {}
        for g in ["all"] + sorted(k for k in self.ious if k != "all"):
            ious = self.ious.get(g, [])
            n = len(ious)
            out[g] = {"Acc@0.5": sum(v >= 0.5 for v in ious) / n if n else float("nan"),
                      "mIoU": math.fsum(ious) / n if n else float("nan"), "n": n}
        return out


def format_table(summary: dict[str, dict[str, float]], columns=("cIoU", "gIoU", "Prec@0.5", "n")) -> str:
    """A plain-text table of :meth:`IoUMeter.summary` (percentages with one decimal)."""
    head = ["group"] + list(columns)
    rows = [head]
    for g, r in summary.items():
        rows.append([g] + [str(r[c]) if c == "n" else f"{100 * r[c]:.1f}" for c in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])
