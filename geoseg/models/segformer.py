"""A light SegFormer (Xie et al., 2021): a hierarchical transformer encoder of overlapping patch
embeddings, efficient self-attention (keys and values spatially reduced) and Mix-FFN (an MLP with a
depthwise convolution instead of position encodings), and an all-MLP decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError
from geoseg.models.common import pad_to_multiple


@dataclass
class SegFormerConfig:
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (32, 64, 128, 256)  # MiT-B0 uses (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    reductions: tuple[int, ...] = (8, 4, 2, 1)  # spatial reduction of keys and values per stage
    mlp_ratio: int = 4
    decoder_width: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.widths)
        if not (len(self.depths) == len(self.heads) == len(self.reductions) == n == 4):
            raise ConfigError("widths, depths, heads and reductions must each give 4 stages")
        for w, h in zip(self.widths, self.heads):
            if w % h:
                raise ConfigError(f"width {w} is not divisible by its {h} attention heads")
        self.widths, self.depths = tuple(self.widths), tuple(self.depths)
        self.heads, self.reductions = tuple(self.heads), tuple(self.reductions)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # (N, h*w, C)


class EfficientSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduce: nn.Module | None = None
        if reduction > 1:
            self.reduce = nn.Conv2d(dim, dim, reduction, reduction)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, length, c = x.shape
        q = self.q(x).reshape(n, length, self.heads, c // self.heads).transpose(1, 2)
        kv = x
        if self.reduce is not None:  # keys and values from a coarser grid: cost / reduction²
            kv = self.reduce(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
            kv = self.norm(kv)
        k, v = self.kv(kv).reshape(n, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, h*w, C / heads)
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        n, _, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(
        self, dim: int, heads: int, reduction: int, mlp_ratio: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, heads, reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, dim * mlp_ratio)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), h, w))
        return x + self.drop(self.ffn(self.norm2(x), h, w))


class SegFormer(nn.Module):
    stride = 32
    global_context = True  # attention sees the whole window

    def __init__(self, cfg: SegFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cin = cfg.in_channels
        self.embeds, self.stages, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, (w, d, hd, r) in enumerate(zip(cfg.widths, cfg.depths, cfg.heads, cfg.reductions)):
            self.embeds.append(OverlapPatchEmbed(cin, w, 7 if i == 0 else 3, 4 if i == 0 else 2))
            self.stages.append(
                nn.ModuleList(Block(w, hd, r, cfg.mlp_ratio, cfg.dropout) for _ in range(d))
            )
            self.norms.append(nn.LayerNorm(w))
            cin = w
        self.linears = nn.ModuleList(nn.Linear(w, cfg.decoder_width) for w in cfg.widths)
        self.fuse = nn.Sequential(
            nn.Conv2d(4 * cfg.decoder_width, cfg.decoder_width, 1, bias=False),
            nn.BatchNorm2d(cfg.decoder_width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(cfg.decoder_width, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0, w0 = x.shape[-2:]
        x = pad_to_multiple(x, self.stride)
        n = x.shape[0]
        features = []
        for embed, blocks, norm, linear in zip(self.embeds, self.stages, self.norms, self.linears):
            t, h, w = embed(x)
            for block in cast(nn.ModuleList, blocks):
                t = block(t, h, w)
            t = norm(t)
            x = t.transpose(1, 2).reshape(n, -1, h, w)  # next stage's input: (N, C, h, w)
            features.append(linear(t).transpose(1, 2).reshape(n, -1, h, w))
        size = features[0].shape[-2:]  # stride 4
        up = [features[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]
        ]
        out = self.head(self.fuse(torch.cat(up[::-1], dim=1)))
        out = F.interpolate(out, scale_factor=4, mode="bilinear", align_corners=False)
        return out[..., :h0, :w0]
