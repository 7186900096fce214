"""FCN-8s (Long et al., 2015): a VGG-style encoder, transposed-convolution upsampling, and the
score maps of pool3 and pool4 fused in on the way up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.models.common import conv_bn_relu, pad_to_multiple


@dataclass
class FCN8sConfig:
    in_channels: int
    num_classes: int
    base_width: int = 32  # VGG16 uses 64; widths double per stage up to 8x
    norm: str = "batch"
    fc_width: int = 512  # the fc6/fc7 layers, as 3x3 and 1x1 convolutions


# VGG16's convolutions per stage
_STAGES = (2, 2, 3, 3, 3)


class FCN8s(nn.Module):
    stride = 32

    def __init__(self, cfg: FCN8sConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_width * min(2**i, 8) for i in range(5)]
        stages, cin = [], cfg.in_channels
        for n, w in zip(_STAGES, widths):
            layers = [conv_bn_relu(cin if i == 0 else w, w, norm=cfg.norm) for i in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Sequential(
            conv_bn_relu(widths[4], cfg.fc_width, norm=cfg.norm),
            nn.Dropout2d(0.1),
            conv_bn_relu(cfg.fc_width, cfg.fc_width, kernel=1, norm=cfg.norm),
        )
        k = cfg.num_classes
        self.score_fr = nn.Conv2d(cfg.fc_width, k, 1)
        self.score_pool4 = nn.Conv2d(widths[3], k, 1)
        self.score_pool3 = nn.Conv2d(widths[2], k, 1)
        self.up2 = nn.ConvTranspose2d(k, k, 4, stride=2, padding=1, bias=False)
        self.up2_pool4 = nn.ConvTranspose2d(k, k, 4, stride=2, padding=1, bias=False)
        self.up8 = nn.ConvTranspose2d(k, k, 16, stride=8, padding=4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.stride)
        pools = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
            pools.append(x)
        pool3, pool4 = pools[2], pools[3]  # strides 8 and 16
        score = self.up2(self.score_fr(self.fc(x)))  # stride 16
        score = self.up2_pool4(score + self.score_pool4(pool4))  # stride 8
        score = self.up8(score + self.score_pool3(pool3))  # stride 1
        return score[..., :h, :w]
