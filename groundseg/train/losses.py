"""LISA's losses: token cross-entropy + per-mask BCE + per-mask Dice (reference/lisa.md §3.1).

Masks are compared at the original image resolution. Per image, BCE and Dice are averaged over its masks; over the
batch, images are weighted by their number of masks, so the result is the mean over all masks of the batch:
``w_bce * sum_masks(bce) / N`` and ``w_dice * sum_masks(dice) / N``. Samples without masks add nothing to N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..grounding.tokens import IGNORE_INDEX


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, H, W) logits and {0,1} targets -> (N,) pixel-mean binary cross-entropy per mask."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """(N, H, W) -> (N,) ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``, sums taken over values divided by
    ``scale`` (LISA's 1000) so that ``eps`` stays small relative to large masks."""
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    num = 2 * (p / scale * t).sum(-1)
    den = (p / scale).sum(-1) + (t / scale).sum(-1)
    return 1 - (num + eps) / (den + eps)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; mean over labels != IGNORE_INDEX in the batch."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def mask_losses(pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor], cfg: LossConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image lists of (n_i, H_i, W_i) logits and targets -> (weighted BCE, weighted Dice) over all masks."""
    bce_sum = dice_sum = None
    n = 0
    for pred, gt in zip(pred_masks, gt_masks):
        if pred.shape != gt.shape:
            raise ValueError(f"predicted masks {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ")
        if pred.shape[0] == 0:
            continue
        b = sigmoid_bce(pred, gt).sum()
        d = dice_loss(pred, gt, cfg.dice_scale, cfg.dice_eps).sum()
        bce_sum = b if bce_sum is None else bce_sum + b
        dice_sum = d if dice_sum is None else dice_sum + d
        n += pred.shape[0]
    if bce_sum is None:
        zero = pred_masks[0].new_zeros(()) if pred_masks else torch.zeros(())
        return zero, zero
    return cfg.bce_weight * bce_sum / (n + 1e-8), cfg.dice_weight * dice_sum / (n + 1e-8)
