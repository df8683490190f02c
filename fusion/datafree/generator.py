"""The generator of data-free fusion (paper 003, Sec. 4 after DFQ [3]): one fully connected
layer, then three nearest-neighbour upsampling + convolution blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Generator(nn.Module):
    """``z`` (B, latent_dim) -> images (B, C, H, W) in [0, 1], the range a party accepts.

    The first feature map is ``ceil(H / 8)`` wide so that three 2x upsamplings reach at least
    the target size; a final resize gives exactly (H, W).
    """

    def __init__(self, out_shape: tuple[int, int, int], latent_dim: int = 256, width: int = 64):
        super().__init__()
        channels, self.height, self.width_px = out_shape
        self.latent_dim = latent_dim
        self.start = math.ceil(max(self.height, self.width_px) / 8)
        self.fc = nn.Linear(latent_dim, 2 * width * self.start**2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Images from ``batch`` draws of z ~ N(0, I), drawn on the host (the same draws on
        every device) and made on the generator's device."""
        z = torch.randn(batch, self.latent_dim, generator=generator)  # (B, latent)
        parameter = next(self.parameters())
        return self(z.to(device=parameter.device, dtype=parameter.dtype))

    def forward(self, z: Tensor) -> Tensor:
        out = self.fc(z).view(len(z), -1, self.start, self.start)  # (B, 2w, s, s)
        out = self.blocks(out)  # (B, C, 8s, 8s)
        if out.shape[-2:] != (self.height, self.width_px):
            out = F.interpolate(
                out, size=(self.height, self.width_px), mode="bilinear", align_corners=False
            )
        return torch.sigmoid(out)


def augment(x: Tensor, shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Random translation by up to ``shift`` pixels (zero padding), per sample; (B, C, H, W)."""
    if shift <= 0:
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator).to(x.device)
    rows = (offsets[:, 0, None] + torch.arange(height, device=x.device)).unsqueeze(2)  # (B, H, 1)
    cols = (offsets[:, 1, None] + torch.arange(width, device=x.device)).unsqueeze(1)  # (B, 1, W)
    index = torch.arange(batch, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2)
