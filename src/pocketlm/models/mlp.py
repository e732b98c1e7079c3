"""The dense feed-forward of a student layer (and of each MoE expert, and the shared experts): SwiGLU.

Its own module so that the student (models/student.py) and the MoE layer (models/moe.py), which the student builds,
both import it from below.

Shape legend: b batch size, s tokens, d hidden size, f intermediate size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) · up(x)): the SwiGLU feed-forward of Shazeer (2020), "GLU Variants Improve Transformer"."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [b, s, f] → [b, s, d]
