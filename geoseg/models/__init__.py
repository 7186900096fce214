"""Segmentation architectures, by name.

>>> model = create_model("unet", in_channels=6, num_classes=7, depth=3, base_width=16)
>>> sorted(MODELS)
['unet']
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from geoseg.errors import ConfigError
from geoseg.models.unet import UNet, UNetConfig

# name -> (module class, its config dataclass)
MODELS: dict[str, tuple[type[nn.Module], type[Any]]] = {
    "unet": (UNet, UNetConfig),
}


def register_model(name: str, cls: type[nn.Module], config: type[Any]) -> None:
    """Add an architecture to the registry (for plug-ins and tests)."""
    MODELS[name] = (cls, config)


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build architecture ``name``; a wrong name or argument lists what is valid."""
    if name not in MODELS:
        raise ConfigError(
            f"unknown architecture {name!r}; expected one of {', '.join(sorted(MODELS))}"
        )
    cls, config_cls = MODELS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"in_channels", "num_classes"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(
            f"{name} takes no argument {', '.join(unknown)}; valid arguments: {', '.join(sorted(fields))}"
        )
    config = config_cls(in_channels=in_channels, num_classes=num_classes, **kwargs)
    model: nn.Module = cls(config)
    return model


def model_arguments(name: str) -> dict[str, Any]:
    """The default keyword arguments of architecture ``name`` (for docs and ``--help``)."""
    _, config_cls = MODELS[name]
    sig = inspect.signature(config_cls)
    return {
        k: p.default for k, p in sig.parameters.items() if k not in ("in_channels", "num_classes")
    }


def measure_receptive_field(model: nn.Module, in_channels: int, start: int = 64) -> int:
    """Measure how far one output pixel sees: the side of the input square whose pixels change
    the centre output pixel's logits (gradient support over 8 random inputs, in float64, so no
    dead activation or max-pool choice hides part of it).

    The input grows until the support no longer reaches its border.
    """
    m = _copy_float64(model)
    size = start
    generator = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, in_channels, size, size, dtype=torch.float64, generator=generator)
        x.requires_grad_(True)
        c = size // 2
        m(x)[:, :, c, c].sum().backward()
        assert x.grad is not None
        support = x.grad.abs().sum((0, 1)) > 0
        rows = torch.nonzero(support.any(1)).flatten()
        cols = torch.nonzero(support.any(0)).flatten()
        if len(rows) == 0:
            return 1
        edge = (
            rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1 or cols.max() == size - 1
        )
        if not edge or size >= 2048:
            return int(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)
        size *= 2


def _copy_float64(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model).double().eval()
    return m
