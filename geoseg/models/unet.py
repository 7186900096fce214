"""U-Net (Ronneberger et al., 2015): a symmetric encoder-decoder with concatenated skips."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError
from geoseg.models.common import check_choice, conv_bn_relu, pad_to_multiple


@dataclass
class UNetConfig:
    in_channels: int
    num_classes: int
    depth: int = 4  # number of resolution levels (depth - 1 poolings)
    base_width: int = 32  # channels at full resolution; doubled at each level
    norm: str = "batch"
    upsample: str = "bilinear"

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, ("batch", "group", "none"))
        check_choice("upsample", self.upsample, ("bilinear", "transposed"))
        if self.depth < 1:
            raise ConfigError(f"depth must be at least 1, got {self.depth}")


def double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, cout, norm=norm), conv_bn_relu(cout, cout, norm=norm))


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
        self.conv = double_conv(2 * cout, cout, cfg.norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stride = 2 ** (cfg.depth - 1)
        widths = [cfg.base_width * 2**i for i in range(cfg.depth)]
        self.down = nn.ModuleList([double_conv(cfg.in_channels, widths[0], cfg.norm)])
        self.down.extend(double_conv(a, b, cfg.norm) for a, b in itertools.pairwise(widths))
        self.up = nn.ModuleList(
            Up(b, a, cfg) for a, b in reversed(list(itertools.pairwise(widths)))
        )
        self.head = nn.Conv2d(widths[0], cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.stride)
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x)[..., :h, :w]  # (N, classes, H, W)
