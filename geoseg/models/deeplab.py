"""DeepLabV3+ (Chen et al., 2018): a ResNet-style backbone with atrous convolutions, atrous
spatial pyramid pooling (ASPP) with image-level pooling, and a decoder that refines the ASPP
output with low-level features at stride 4."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError
from geoseg.models.common import conv_bn_relu, norm_layer, pad_to_multiple
from geoseg.models.resnet import RESNETS, ResNetEncoder


@dataclass
class DeepLabV3PlusConfig:
    in_channels: int
    num_classes: int
    base_width: int = 32  # ResNet-18 uses 64; the four stages have 1x, 2x, 4x, 8x this
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage (ResNet-18)
    output_stride: int = 16  # 16 or 8: where the backbone stops downsampling
    aspp_rates: tuple[int, ...] = (6, 12, 18)  # at output stride 16; doubled at 8
    aspp_width: int = 128
    image_pooling: bool = True
    low_level_width: int = 48
    decoder_width: int = 128
    norm: str = "batch"
    # "native": the stem and stages above (base_width, blocks, norm); or a ResNet in the
    # torchvision/timm layout ("resnet18", "resnet34", "resnet50", "resnet101"), whose
    # published weights load by name (train --init-weights)
    backbone: str = "native"

    def __post_init__(self) -> None:
        if self.backbone != "native" and self.backbone not in RESNETS:
            raise ConfigError(
                f"backbone must be native or one of {', '.join(RESNETS)}, got {self.backbone!r}"
            )
        if self.output_stride not in (8, 16):
            raise ConfigError(f"output_stride must be 8 or 16, got {self.output_stride}")
        if len(self.blocks) != 4:
            raise ConfigError(f"blocks must give 4 stages, got {len(self.blocks)}")
        self.blocks = tuple(self.blocks)
        self.aspp_rates = tuple(self.aspp_rates)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int, norm: str) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, stride=stride, dilation=dilation, norm=norm)
        self.conv2 = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
            norm_layer(norm, cout),
        )
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.skip(x))


class ASPP(nn.Module):
    def __init__(
        self, cin: int, cout: int, rates: tuple[int, ...], pooling: bool, norm: str
    ) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout, kernel=1, norm=norm)]
        branches += [conv_bn_relu(cin, cout, dilation=r, norm=norm) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = None
        if pooling:  # GroupNorm, not BatchNorm: a 1x1 map has no spatial statistics
            self.pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(cin, cout, 1, bias=False),
                norm_layer("group" if norm == "batch" else norm, cout),
                nn.ReLU(inplace=True),
            )
        n = len(branches) + (1 if pooling else 0)
        self.project = nn.Sequential(
            conv_bn_relu(n * cout, cout, kernel=1, norm=norm), nn.Dropout2d(0.1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        if self.pool is not None:
            outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(nn.Module):
    def __init__(self, cfg: DeepLabV3PlusConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stride = cfg.output_stride
        self.global_context = cfg.image_pooling
        w = cfg.base_width
        scale = 16 // cfg.output_stride
        rates = tuple(r * scale for r in cfg.aspp_rates)
        self.backbone: ResNetEncoder | None = None
        if cfg.backbone != "native":
            self.backbone = ResNetEncoder(cfg.backbone, cfg.in_channels, cfg.output_stride)
            self._head(cfg, self.backbone.out_channels, self.backbone.low_channels, rates)
            return
        self.stem = nn.Sequential(
            conv_bn_relu(cfg.in_channels, w, stride=2, norm=cfg.norm),
            conv_bn_relu(w, w, norm=cfg.norm),
            nn.MaxPool2d(3, stride=2, padding=1),
        )  # stride 4
        # (stride, dilation) of stages 2-4: stop downsampling at the output stride, dilate instead
        plan = [(2, 1), (2, 1), (1, 2)] if cfg.output_stride == 16 else [(2, 1), (1, 2), (1, 4)]
        widths = [w, 2 * w, 4 * w, 8 * w]
        stages, cin = [], w
        for i, (n, cout) in enumerate(zip(cfg.blocks, widths)):
            s, d = (1, 1) if i == 0 else plan[i - 1]
            blocks = [BasicBlock(cin, cout, s, d, cfg.norm)]
            blocks += [BasicBlock(cout, cout, 1, d, cfg.norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self._head(cfg, widths[3], widths[0], rates)

    def _head(self, cfg: DeepLabV3PlusConfig, deep: int, low: int, rates: tuple[int, ...]) -> None:
        """ASPP over the backbone's last features (``deep`` channels), the decoder that joins
        them with its stride-4 features (``low`` channels), and the classifier."""
        self.aspp = ASPP(deep, cfg.aspp_width, rates, cfg.image_pooling, cfg.norm)
        self.low = conv_bn_relu(low, cfg.low_level_width, kernel=1, norm=cfg.norm)
        self.decoder = nn.Sequential(
            conv_bn_relu(cfg.aspp_width + cfg.low_level_width, cfg.decoder_width, norm=cfg.norm),
            conv_bn_relu(cfg.decoder_width, cfg.decoder_width, norm=cfg.norm),
        )
        self.head = nn.Conv2d(cfg.decoder_width, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.stride)
        if self.backbone is not None:
            low, x = self.backbone(x)
        else:
            x = self.stem(x)
            low = x = self.stages[0](x)  # stride 4
            for stage in self.stages[1:]:
                x = stage(x)  # ends at the output stride
        x = F.interpolate(self.aspp(x), size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.decoder(torch.cat([x, self.low(low)], dim=1))
        x = F.interpolate(self.head(x), scale_factor=4, mode="bilinear", align_corners=False)
        return x[..., :h, :w]
