"""Segmentation architectures, by name.

>>> model = create_model("unet", in_channels=6, num_classes=7, depth=3, base_width=16)
>>> sorted(MODELS)
['deeplabv3plus', 'fcn8s', 'segformer', 'unet']

Every model takes any band count and any height and width: models that downsample pad their input
to a multiple of their output stride and crop the output back, so output size equals input size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError
from geoseg.models.deeplab import DeepLabV3Plus, DeepLabV3PlusConfig
from geoseg.models.fcn import FCN8s, FCN8sConfig
from geoseg.models.segformer import SegFormer, SegFormerConfig
from geoseg.models.unet import UNet, UNetConfig

# name -> (module class, its config dataclass)
MODELS: dict[str, tuple[type[nn.Module], type[Any]]] = {
    "unet": (UNet, UNetConfig),
    "fcn8s": (FCN8s, FCN8sConfig),
    "deeplabv3plus": (DeepLabV3Plus, DeepLabV3PlusConfig),
    "segformer": (SegFormer, SegFormerConfig),
}


class Ensemble(nn.Module):
    """Models of one architecture, trained apart, run as one: the output is the log of their
    mean class probabilities, whose softmax is that mean and whose argmax is its class, so
    prediction runs an ensemble as it runs any model (``geoseg ensemble``)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = sum(m(x).float().softmax(1) for m in self.members)
        assert isinstance(total, torch.Tensor)
        return torch.log((total / len(self.members)).clamp_min(1e-30))


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
    defaults = model_arguments(name)
    for key, value in kwargs.items():
        if not _same_kind(value, defaults[key]):
            raise ConfigError(
                f"{name} argument {key}={value!r}: expected {_kind(defaults[key])}, such as the "
                f"default {key}={defaults[key]!r}"
            )
    try:
        config = config_cls(in_channels=in_channels, num_classes=num_classes, **kwargs)
        model: nn.Module = cls(config)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(
            f"{name} cannot be built with {given} ({exc or type(exc).__name__}); the defaults "
            f"are {', '.join(f'{k}={v!r}' for k, v in defaults.items())}"
        ) from None
    return model


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number" if isinstance(default, float) else "an integer"
    if isinstance(default, (tuple, list)):
        return "a list such as [1, 2]"
    return "a word" if isinstance(default, str) else type(default).__name__


def _same_kind(value: Any, default: Any) -> bool:
    """Whether ``value`` can stand where the architecture's default is ``default``."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return (
            isinstance(value, (tuple, list)) and all(_same_kind(v, default[0]) for v in value)
            if default
            else isinstance(value, (tuple, list))
        )
    return isinstance(value, type(default))


def model_arguments(name: str) -> dict[str, Any]:
    """The default keyword arguments of architecture ``name`` (for docs and ``--help``)."""
    _, config_cls = MODELS[name]
    sig = inspect.signature(config_cls)
    return {
        k: p.default for k, p in sig.parameters.items() if k not in ("in_channels", "num_classes")
    }


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def receptive_field(model: nn.Module, in_channels: int) -> int | None:
    """The model's receptive field in pixels, measured; ``None`` where every output pixel sees
    the whole input (attention, image-level pooling)."""
    if getattr(model, "global_context", False):
        return None
    return measure_receptive_field(model, in_channels)


def measure_receptive_field(model: nn.Module, in_channels: int, start: int = 64) -> int:
    """Measure the receptive field: perturb one input pixel and see how far the output changes,
    the widest over the pixel's positions relative to the model's stride.

    The measurement runs on a slim copy (every width 2; the field depends on the geometry only)
    whose activations are made linear (ReLU becomes identity, max-pooling average pooling of the
    same geometry), in float64, so no dead unit or max choice hides part of the field. Kernels are
    square, so the field is measured along rows on a narrow strip. The input grows until the
    change no longer reaches its border.
    """
    m = _slim(model).double().eval()
    stride = int(getattr(model, "stride", 1))
    phases = min(stride, 32)
    width = max(2 * stride, 32)
    size = start
    with torch.no_grad(), _linear_activations():
        while True:
            x = torch.zeros(phases, in_channels, size, width, dtype=torch.float64)
            c = size // 2 - phases // 2
            for k in range(phases):  # sample k perturbs pixel (c + k, centre): every phase at once
                x[k, :, c + k, width // 2] = 1.0
            changed = (m(x) - m(torch.zeros_like(x))).abs().sum(1) > 0  # (phases, size, width)
            extent, edge = 1, False
            for g in changed:
                rows = torch.nonzero(g.any(1)).flatten()
                if len(rows) == 0:
                    continue
                extent = max(extent, int(rows.max() - rows.min()) + 1)
                edge |= bool(rows.min() == 0 or rows.max() == size - 1)
            if not edge or size >= 8192:
                return extent
            size *= 2


def _slim(model: nn.Module) -> nn.Module:
    """A copy with the same geometry and every width set to 2 (for models built from a config)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return copy.deepcopy(model)
    narrow: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if "width" in f.name and isinstance(v, int):
            narrow[f.name] = 2
        elif "width" in f.name and isinstance(v, tuple):
            narrow[f.name] = tuple(2 for _ in v)
    return type(model)(dataclasses.replace(cfg, **narrow))  # type: ignore[type-var]


@contextlib.contextmanager
def _linear_activations() -> Iterator[None]:
    def avg_pool(
        x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, *a: Any, **k: Any
    ) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size, stride if stride is not None else kernel_size, padding)

    saved = (F.relu, F.max_pool2d, F.gelu)
    F.relu = lambda x, inplace=False: x  # type: ignore[assignment]
    F.gelu = lambda x, approximate="none": x  # type: ignore[assignment]
    F.max_pool2d = avg_pool  # type: ignore[assignment]
    try:
        yield
    finally:
        F.relu, F.max_pool2d, F.gelu = saved
