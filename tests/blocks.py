"""Small hand-written blocks with the structure of video-UNet layers, shared by the pass-level tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialBlock(nn.Module):
    """Per-frame ResBlock on (B*T, C, H, W): GroupNorm per frame, 3x3 convolutions."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm(x)))
        return x + self.conv2(F.silu(h))


class TemporalBlock(nn.Module):
    """SVD-style temporal ResBlock on (B, C, T, H, W): GroupNorm over (C, T, H, W), (3,1,1) convolutions."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(2, c)
        self.conv1 = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(2, c)
        self.conv2 = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class VideoBlock(nn.Module):
    """A spatial block then a temporal block, reshaping between (B*T, C, H, W) and (B, C, T, H, W)."""

    def __init__(self, c: int = 8, frames: int = 3):
        super().__init__()
        self.frames = frames
        self.spatial = SpatialBlock(c)
        self.temporal = TemporalBlock(c)

    def forward(self, x):
        bt, c, h, w = x.shape
        x = self.spatial(x)
        x = x.reshape(bt // self.frames, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
        x = self.temporal(x)
        return x.permute(0, 2, 1, 3, 4).reshape(bt, c, h, w)
