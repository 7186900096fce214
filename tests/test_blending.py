import numpy as np
import pytest

from geoseg.blending import window_weights
from geoseg.errors import ConfigError


@pytest.mark.parametrize("mode", ["trim", "gaussian", "cosine", "none"])
def test_weights_are_positive_symmetric_and_peak_in_the_centre(mode):
    w = window_weights(64, mode, 16)
    assert w.shape == (64, 64) and (w > 0).all()
    np.testing.assert_allclose(w, w[::-1, ::-1])
    np.testing.assert_allclose(w, w.T)
    assert w[32, 32] == w.max()
    if mode != "none":
        assert w[0, 0] < 0.01 * w.max()


def test_unknown_blend_lists_the_choices():
    with pytest.raises(ConfigError, match="gaussian, cosine, none"):
        window_weights(8, "linear")


@pytest.mark.parametrize("overlap", [0, 7, 16, 31])
def test_trim_centres_of_neighbouring_windows_tile_the_axis(overlap):
    from geoseg.tiling import axis_starts

    window, length = 64, 300
    w1 = window_weights(window, "trim", overlap)[window // 2]
    full = np.zeros(length + window)
    for s in axis_starts(length, window, window - overlap):
        full[s : s + window] += w1 == 1.0
    inner = slice(overlap // 2, length - overlap)  # away from the scene's own edges
    assert (full[inner] == 1).all()  # every pixel at full weight in exactly one window
