"""A ResNet encoder in the layout of torchvision's and timm's ResNets (``conv1``, ``bn1``,
``layer1``-``layer4`` of basic or bottleneck blocks with ``downsample``), so that published
weights load by name: the ImageNet ResNets, and remote-sensing ResNets trained in that layout
(SSL4EO-S12, SatlasPretrain's ResNets and others). Written here, not imported: geoseg does not
depend on torchvision.

:func:`load_encoder_weights` loads such a state dict into a model's ``backbone``, with the first
convolution adapted to the scene's band count (the usual repeat-and-scale).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from geoseg.errors import ConfigError

# name -> (block, blocks per stage)
RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, dilation: int, first: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, first, dilation=first, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int, first: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, first, dilation=first, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNetEncoder(nn.Module):
    """ResNet ``name`` without its classifier, stopping its downsampling at ``output_stride``
    (16 or 8) and dilating instead, as DeepLab does. ``forward`` gives the stride-4 features of
    ``layer1`` and the last stage's."""

    def __init__(self, name: str, in_channels: int, output_stride: int = 16) -> None:
        super().__init__()
        kind, counts = RESNETS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dilated = {16: (False, False, True), 8: (False, True, True)}[output_stride]
        cin, dilation = 64, 1
        layers = []
        for i, (n, width) in enumerate(zip(counts, (64, 128, 256, 512))):
            stride, first = (1 if i == 0 else 2), dilation
            if i > 0 and dilated[i - 1]:
                dilation, stride = dilation * 2, 1
            blocks = [block(cin, width, stride, dilation, first)]
            cin = width * block.expansion
            blocks += [block(cin, width, 1, dilation, dilation) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.low_channels = 64 * block.expansion
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = x = self.layer1(x)
        x = self.layer4(self.layer3(self.layer2(x)))
        return low, x


_PREFIXES = re.compile(r"^(module\.|model\.|backbone\.|encoder\.|net\.)+")


def load_encoder_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "the weights"
) -> tuple[list[str], list[str]]:
    """Load a ResNet state dict in the torchvision/timm layout into ``model.backbone``: keys
    may carry a ``module.``/``backbone.``/``encoder.`` prefix, a checkpoint may nest them under
    ``state_dict`` or ``model``; the classifier (``fc.``) is dropped; the first convolution is
    adapted to the model's band count (its input channels repeated in turn and scaled by
    pretrained bands / bands, so the response to a uniform image stays). Returns the backbone's
    keys the weights lacked and the weights' keys the backbone has no place for; raises
    :class:`ConfigError` when the model has no ResNet backbone, when nothing matches, or a
    matching key has another shape."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, ResNetEncoder):
        raise ConfigError(
            "encoder weights load into DeepLabV3+'s ResNet backbone; pass --arch deeplabv3plus "
            "--arch-arg backbone=resnet50 (or resnet18, resnet34, resnet101, as the weights are)"
        )
    for nest in ("state_dict", "model", "teacher", "student"):
        inner = state.get(nest) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
            state = inner
            break
    weights = {
        _PREFIXES.sub("", k): v
        for k, v in state.items()
        if torch.is_tensor(v) and not _PREFIXES.sub("", k).startswith("fc.")
    }
    own = backbone.state_dict()
    if "conv1.weight" in weights:
        weights["conv1.weight"] = _adapt_first_conv(weights["conv1.weight"], own["conv1.weight"])
    wrong = [
        f"{k} {tuple(v.shape)} (the backbone has {tuple(own[k].shape)})"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    matched = [k for k in weights if k in own]
    if wrong or not matched:
        why = (
            f"these shapes differ: {'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}"
            if wrong
            else f"none of its {len(weights)} keys (e.g. {', '.join(list(weights)[:3])}) names a "
            "layer of the backbone (conv1, bn1, layer1.0.conv1, ...)"
        )
        raise ConfigError(
            f"{source} do not fit the {_name(backbone)} backbone: {why}; use weights of the "
            "same ResNet in the torchvision/timm layout, or another --arch-arg backbone="
        )
    result = backbone.load_state_dict(weights, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _adapt_first_conv(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``w`` (out, pretrained bands, k, k) for ``like``'s band count: bands repeated in turn,
    scaled by pretrained bands / bands."""
    have, want = w.shape[1], like.shape[1]
    if have == want or w.dim() != 4:
        return w
    index = torch.arange(want) % have
    return w[:, index] * (have / want)


def _name(backbone: ResNetEncoder) -> str:
    counts = tuple(
        len(layer) for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
    )
    kind = "basic" if isinstance(backbone.layer1[0], BasicBlock) else "bottleneck"
    return next((n for n, (k, c) in RESNETS.items() if (k, c) == (kind, counts)), "ResNet")
