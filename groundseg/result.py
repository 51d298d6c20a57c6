"""The result of grounding one prompt on one image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    """Answer text and its masks, all at the original image size.

    ``masks`` (N, H, W) bool; ``scores`` (N,) mean foreground probability inside each mask (0 for an empty
    mask); ``boxes`` (N, 4) xyxy pixels of each mask (x2/y2 exclusive); ``phrases`` one per mask (None when
    unknown); ``sources`` one per mask: ``"seg"`` for a ``[SEG]`` token, ``"box"`` for a ``<box>`` in the answer.
    """

    text: str
    masks: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    phrases: list[str | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.masks)
