"""Hidden state -> decoder prompt: LISA's ``text_hidden_fcs`` (the paper's projection gamma).

``Linear(H, H) -> ReLU -> Linear(H, out_dim) -> Dropout(0)``, held in a one-element ``ModuleList`` so that the
parameter names are those of the official checkpoints (``text_hidden_fcs.0.0.*``, ``text_hidden_fcs.0.2.*``).
"""

from __future__ import annotations

import torch
from torch import nn


class TextHiddenProjector(nn.Module):
    """(..., H) last-layer states -> (..., out_dim) prompt embeddings."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, out_dim),
            nn.Dropout(0.0))])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc = self.text_hidden_fcs[0]
        return fc(hidden_states.to(fc[0].weight.dtype))
