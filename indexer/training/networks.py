"""The networks trained on a catalog: convolutional autoencoders of feature maps or pixels."""

from __future__ import annotations

import math

import torch
from torch import nn


class FeatureMapAutoencoder(nn.Module):
    """(C, s, s) feature maps -> a (code_channels, ceil(s/2), ceil(s/2)) bottleneck -> (C, s, s)."""

    def __init__(self, channels: int, code_channels: int = 16, width: int = 192, size: int = 7):
        super().__init__()
        # Transposed convolution back from ceil(size / 2) lands on 2 * ceil(size / 2) - 1 cells.
        extra = size - (2 * math.ceil(size / 2) - 1)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width // 2, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, code_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code_channels, width // 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width // 2, width // 2, 3, stride=2, padding=1, output_padding=extra),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return code, self.decoder(code)


class PixelAutoencoder(nn.Module):
    """(3, 64, 64) images -> a (code_channels, 4, 4) bottleneck -> (3, 64, 64)."""

    def __init__(self, channels: int = 3, code_channels: int = 16, width: int = 32):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.ReLU(inplace=True),  # 32
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(inplace=True),  # 16
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU(inplace=True),  # 8
            nn.Conv2d(4 * w, code_channels, 4, 2, 1),  # 4
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(code_channels, 4 * w, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, channels, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return code, self.decoder(code)


def build_autoencoder(input_kind: str, shape: tuple[int, ...], code_channels: int, width: int) -> nn.Module:
    channels = shape[0]
    if input_kind == "features":
        return FeatureMapAutoencoder(channels, code_channels, width, size=shape[1])
    if input_kind == "pixels":
        return PixelAutoencoder(channels, code_channels, width)
    raise ValueError(f"autoencoder input must be 'features' or 'pixels', not {input_kind!r}")

