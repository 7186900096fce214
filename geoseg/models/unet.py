"""U-Net (Ronneberger et al., 2015): a symmetric encoder-decoder with concatenated skips."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError

_NORMS = ("batch", "group", "none")
_UPSAMPLING = ("bilinear", "transposed")


@dataclass
class UNetConfig:
    in_channels: int
    num_classes: int
    depth: int = 4  # number of resolution levels (depth - 1 poolings)
    base_width: int = 32  # channels at full resolution; doubled at each level
    norm: str = "batch"
    upsample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.norm not in _NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; expected one of {', '.join(_NORMS)}")
        if self.upsample not in _UPSAMPLING:
            raise ConfigError(
                f"unknown upsample {self.upsample!r}; expected one of {', '.join(_UPSAMPLING)}"
            )
        if self.depth < 1:
            raise ConfigError(f"depth must be at least 1, got {self.depth}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.upsample == "transposed":
            self.up: nn.Module = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, cout, 1),
            )
        self.conv = DoubleConv(2 * cout, cout, cfg.norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_width * 2**i for i in range(cfg.depth)]
        self.down = nn.ModuleList([DoubleConv(cfg.in_channels, widths[0], cfg.norm)])
        self.down.extend(DoubleConv(a, b, cfg.norm) for a, b in itertools.pairwise(widths))
        self.up = nn.ModuleList(
            Up(b, a, cfg) for a, b in reversed(list(itertools.pairwise(widths)))
        )
        self.head = nn.Conv2d(widths[0], cfg.num_classes, 1)

    @property
    def stride(self) -> int:
        return 2 ** (self.cfg.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.stride
        ph, pw = -h % s, -w % s  # pad to a multiple of the output stride, crop back below
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x)[..., :h, :w]  # (N, classes, H, W)
