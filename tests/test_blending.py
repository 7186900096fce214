import numpy as np
import pytest

from geoseg.blending import window_weights
from geoseg.errors import ConfigError


@pytest.mark.parametrize("mode", ["gaussian", "cosine", "none"])
def test_weights_are_positive_symmetric_and_peak_in_the_centre(mode):
    w = window_weights(64, mode)
    assert w.shape == (64, 64) and (w > 0).all()
    np.testing.assert_allclose(w, w[::-1, ::-1])
    np.testing.assert_allclose(w, w.T)
    assert w[32, 32] == w.max()
    if mode != "none":
        assert w[0, 0] < 0.01 * w.max()


def test_unknown_blend_lists_the_choices():
    with pytest.raises(ConfigError, match="gaussian, cosine, none"):
        window_weights(8, "linear")
