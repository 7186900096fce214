import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from geoseg.errors import ConfigError
from geoseg.losses import make_loss
from geoseg.models import (
    MODELS,
    _linear_activations,
    create_model,
    parameter_count,
    receptive_field,
)

from .conftest import LABELS, SCENE

# small configurations of each architecture: the tests are about structure, not capacity
SMALL = {
    "unet": {"depth": 3, "base_width": 8},
    "fcn8s": {"base_width": 8, "fc_width": 64},
    "deeplabv3plus": {
        "base_width": 8,
        "aspp_width": 32,
        "decoder_width": 32,
        "low_level_width": 16,
    },
    "segformer": {"widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "decoder_width": 64},
}


def test_every_registered_architecture_is_tested():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("bands", [1, 6, 13])
def test_output_size_equals_input_size_for_odd_shapes(name, bands):
    model = create_model(name, bands, 5, **SMALL[name]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, bands, 97, 131))
    assert out.shape == (2, 5, 97, 131)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_the_first_layer(name):
    model = create_model(name, 4, 3, **SMALL[name])
    model(torch.randn(2, 4, 64, 64)).sum().backward()
    first = next(p for p in model.parameters() if p.ndim == 4)
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())


def _reach(model: torch.nn.Module, size: int, at: tuple[int, int]) -> tuple[int, torch.Tensor]:
    """How far (px) a change of one input pixel spreads in the output, in float64."""
    torch.manual_seed(1)
    model = model.double()
    x = torch.randn(1, 2, size, size, dtype=torch.float64)
    y = x.clone()
    y[0, :, at[0], at[1]] += 10.0
    with torch.no_grad():
        changed = (model(x) - model(y)).abs().sum(1)[0] > 0
    rows = torch.nonzero(changed.any(1)).flatten()
    cols = torch.nonzero(changed.any(0)).flatten()
    return max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1, changed


@pytest.mark.parametrize("name", ["unet", "fcn8s"])
def test_reported_receptive_field_matches_a_perturbation(name):
    torch.manual_seed(0)
    model = create_model(name, 2, 3, **SMALL[name]).eval()
    rf = receptive_field(model, 2)
    assert rf is not None and rf > 1
    size = 2 * rf + 64
    centre = (size // 2, size // 2)
    # the model as it is: a pixel never changes outputs farther away than the field
    reach, _ = _reach(model, size, centre)
    assert reach <= rf
    # with linear activations (so no ReLU or max-pool choice blocks a path) a pixel at any
    # position relative to the stride reaches within one stride of the whole field
    stride = model.stride
    with _linear_activations():
        reaches = [
            _reach(model, size, (centre[0] + k, centre[1] + k))[0] for k in range(0, stride, 8)
        ]
    assert rf - stride <= max(reaches) <= rf


@pytest.mark.parametrize("name", ["deeplabv3plus", "segformer"])
def test_global_models_report_a_global_receptive_field(name):
    model = create_model(name, 2, 3, **SMALL[name]).eval()
    assert receptive_field(model, 2) is None
    _, changed = _reach(model, 128, (0, 0))
    assert changed[-1, -1]  # a corner pixel changes the opposite corner


def test_deeplab_without_image_pooling_has_a_finite_field():
    kw = {**SMALL["deeplabv3plus"], "image_pooling": False, "aspp_rates": (2, 4, 6)}
    model = create_model("deeplabv3plus", 2, 3, **kw).eval()
    rf = receptive_field(model, 2)
    assert rf is not None and 64 < rf < 1024


def test_wrong_name_or_argument_lists_what_is_valid():
    with pytest.raises(ConfigError, match="expected one of deeplabv3plus, fcn8s, segformer, unet"):
        create_model("segnet", 3, 2)
    with pytest.raises(ConfigError, match="valid arguments: base_width, depth, norm, upsample"):
        create_model("unet", 3, 2, width=3)
    with pytest.raises(ConfigError, match="output_stride must be 8 or 16"):
        create_model("deeplabv3plus", 3, 2, output_stride=32)
    with pytest.raises(ConfigError, match="expected one of batch, group, none"):
        create_model("fcn8s", 3, 2, norm="layer")


def _nc_chip() -> tuple[torch.Tensor, torch.Tensor]:
    # 56 % herbaceous, 43 % forest, some developed and water. Stride-4 decoders (DeepLabV3+,
    # SegFormer) cannot draw single-pixel detail; this chip's patches are wide enough for them.
    w = Window(224, 248, 64, 64)
    with rasterio.open(SCENE) as s:
        x = s.read(window=w).astype(np.float32)
    with rasterio.open(LABELS) as s:
        y = s.read(1, window=w).astype(np.int64)
    x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    return torch.from_numpy(x)[None], torch.from_numpy(np.where(y == 0, 255, y - 1))[None]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_architecture_overfits_a_real_chip(name):
    x, y = _nc_chip()
    majority = np.bincount(y[y != 255].numpy()).max() / int((y != 255).sum())
    assert majority < 0.6  # so 95 % means the model learned the chip
    torch.manual_seed(0)
    model = create_model(name, 6, 7, **SMALL[name])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loss = make_loss("ce")
    for step in range(1, 301):
        model.train()
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x).argmax(1) == y)[y != 255].float().mean().item()
            if acc >= 0.95:
                break
    assert acc >= 0.95, f"{name}: {acc:.3f} after {step} steps"


def _torchvision_resnet(blocks: tuple[int, ...], bottleneck: bool, bands: int) -> dict:
    """Key names and shapes of torchvision's ResNet state dict, written out from its layout
    (conv1/bn1, layerN.M.convK/bnK, a downsample where the shape changes, fc): what published
    ResNet weights (ImageNet, SSL4EO-S12) hold. 122 tensors for ResNet-18, 320 for ResNet-50."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, bands, 7, 7)}

    def bn(name: str, c: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{part}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin, grow = 64, 4 if bottleneck else 1
    for i, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
        for j in range(n):
            pre = f"layer{i}.{j}"
            convs = (
                [(w, cin, 1, 1), (w, w, 3, 3), (w * 4, w, 1, 1)]
                if bottleneck
                else [(w, cin, 3, 3), (w, w, 3, 3)]
            )
            for k, shape in enumerate(convs, 1):
                keys[f"{pre}.conv{k}.weight"] = shape
                bn(f"{pre}.bn{k}", shape[0])
            if j == 0 and (i > 1 or cin != w * grow):
                keys[f"{pre}.downsample.0.weight"] = (w * grow, cin, 1, 1)
                bn(f"{pre}.downsample.1", w * grow)
            cin = w * grow
    keys["fc.weight"], keys["fc.bias"] = (1000, 512 * grow), (1000,)
    return keys


@pytest.mark.parametrize(
    "backbone, blocks, bottleneck, count",
    [("resnet18", (2, 2, 2, 2), False, 122), ("resnet50", (3, 4, 6, 3), True, 320)],
)
def test_published_resnet_weights_load_into_deeplabs_backbone(backbone, blocks, bottleneck, count):
    """A state dict with the key names and shapes of a 13-band SSL4EO-S12 ResNet (nested and
    prefixed as checkpoints often are) loads into a 6-band DeepLabV3+: every tensor lands, the
    first convolution's 13 bands are repeated in turn and scaled by 13/6, the classifier is
    dropped. No weights can be downloaded here: this is their layout, not their values."""
    from geoseg.models.resnet import load_encoder_weights

    layout = _torchvision_resnet(blocks, bottleneck, 13)
    assert len(layout) == count
    g = torch.Generator().manual_seed(0)
    weights = {
        k: torch.randint(0, 9, s)
        if k.endswith("num_batches_tracked")
        else torch.randn(s, generator=g)
        for k, s in layout.items()
    }
    model = create_model("deeplabv3plus", 6, 7, backbone=backbone)
    ckpt = {"state_dict": {f"module.backbone.{k}": v for k, v in weights.items()}, "epoch": 99}
    missing, unexpected = load_encoder_weights(model, ckpt)
    assert missing == [] and unexpected == []
    own = model.backbone.state_dict()
    assert set(own) == set(layout) - {"fc.weight", "fc.bias"}
    for k, v in own.items():
        if k != "conv1.weight":
            assert torch.equal(v, weights[k]), k
    w13 = weights["conv1.weight"]
    expected = torch.stack([w13[:, i % 13] for i in range(6)], 1) * (13 / 6)
    torch.testing.assert_close(own["conv1.weight"], expected)
    assert model(torch.randn(1, 6, 64, 64)).shape == (1, 7, 64, 64)


def test_encoder_weights_that_do_not_fit_get_one_clear_line():
    from geoseg.models.resnet import load_encoder_weights

    r18 = {k: torch.zeros(s) for k, s in _torchvision_resnet((2, 2, 2, 2), False, 3).items()}
    with pytest.raises(ConfigError, match=r"do not fit the resnet50 backbone: these shapes differ"):
        load_encoder_weights(create_model("deeplabv3plus", 6, 7, backbone="resnet50"), r18)
    with pytest.raises(ConfigError, match="none of its 2 keys"):
        load_encoder_weights(
            create_model("deeplabv3plus", 6, 7, backbone="resnet18"),
            {"head.weight": torch.zeros(1), "head.bias": torch.zeros(1)},
        )
    with pytest.raises(ConfigError, match="--arch-arg backbone=resnet50"):
        load_encoder_weights(create_model("deeplabv3plus", 6, 7), r18)
    with pytest.raises(ConfigError, match="backbone must be native or one of resnet18"):
        create_model("deeplabv3plus", 6, 7, backbone="vit")


def test_training_starts_from_the_encoder_weights(tmp_path, dask_client):
    """train --init-weights: the trained bundle's backbone is the given weights moved by one
    short epoch, not a fresh initialisation; a pickled file is refused before any work."""
    from geoseg import load_bundle
    from geoseg.stages.train import train

    layout = _torchvision_resnet((2, 2, 2, 2), False, 3)
    g = torch.Generator().manual_seed(1)
    weights = {
        k: torch.zeros(s, dtype=torch.long) if not s else torch.randn(s, generator=g) * 0.05
        for k, s in layout.items()
    }
    for k in weights:
        if k.endswith("running_var"):
            weights[k] = weights[k].abs() + 1
    path = tmp_path / "r18.pth"
    torch.save(weights, path)
    args = {"backbone": "resnet18", "aspp_width": 16, "decoder_width": 16, "low_level_width": 8}
    out = train(
        SCENE, LABELS, tmp_path / "m.bundle", arch="deeplabv3plus", arch_args=args,
        init_weights=path, epochs=1, samples_per_epoch=8, batch_size=4, client=dask_client,
    )  # fmt: skip
    got = load_bundle(out.path).model.backbone.state_dict()
    moved = (got["layer4.1.conv2.weight"] - weights["layer4.1.conv2.weight"]).abs().max()
    assert moved < 0.02  # a fresh Kaiming initialisation differs by ~0.2 here
    fresh = create_model("deeplabv3plus", 6, 7, **args).backbone.state_dict()
    assert (fresh["layer4.1.conv2.weight"] - weights["layer4.1.conv2.weight"]).abs().max() > 0.1
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1), "hook": print}, bad)  # pickles a function
    with pytest.raises(ConfigError, match="could not be read as a plain state dict"):
        train(
            SCENE, LABELS, tmp_path / "n.bundle", arch="deeplabv3plus", arch_args=args,
            init_weights=bad, client=dask_client,
        )  # fmt: skip
    assert not (tmp_path / "n.bundle").exists()
