"""Building blocks shared by the architectures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import check_choice

NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    check_choice("norm", kind, NORMS)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def conv_bn_relu(
    cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1, norm: str = "batch"
) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=norm == "none"),
        norm_layer(norm, cout),
        nn.ReLU(inplace=True),
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad height and width at the bottom and right up to a multiple (reflecting where the
    input is large enough); callers crop their output back to the input size."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)
