import pytest
import torch

from geoseg.errors import ConfigError
from geoseg.models import create_model, measure_receptive_field


@pytest.mark.parametrize("bands", [1, 6, 13])
def test_unet_output_matches_input_size_for_odd_shapes(bands):
    model = create_model("unet", bands, 5, depth=3, base_width=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, bands, 97, 131))
    assert out.shape == (2, 5, 97, 131)


def test_gradients_reach_the_first_layer():
    model = create_model("unet", 4, 3, depth=3, base_width=4)
    model(torch.randn(2, 4, 32, 32)).sum().backward()
    first = next(model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_wrong_name_or_argument_lists_what_is_valid():
    with pytest.raises(ConfigError, match="expected one of unet"):
        create_model("segnet", 3, 2)
    with pytest.raises(ConfigError, match="valid arguments: base_width, depth, norm, upsample"):
        create_model("unet", 3, 2, width=3)


def test_receptive_field_bounds_how_far_a_pixel_changes_the_output():
    torch.manual_seed(0)
    model = create_model("unet", 2, 3, depth=3, base_width=4).eval()
    rf = measure_receptive_field(model, 2)
    x = torch.randn(1, 2, 128, 128)
    y = x.clone()
    y[0, :, 64, 64] += 10.0
    with torch.no_grad():
        diff = (model(x) - model(y)).abs().sum(1)[0] > 1e-6
    rows = torch.nonzero(diff.any(1)).flatten()
    cols = torch.nonzero(diff.any(0)).flatten()
    reach = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
    assert 0.5 * rf <= reach <= rf
