import pytest
import torch

from geoseg import load_bundle
from geoseg.errors import BandMismatchError, BundleError
from geoseg.io import read_profile

from .conftest import SCENE


def test_bundle_round_trip_keeps_model_and_contract(random_bundle, tmp_path):
    from geoseg.bundle import save_bundle

    b = load_bundle(random_bundle)
    assert not b.model.training
    assert [c.id for c in b.classes] == [1, 5, 9] and b.window == 64 and len(b.bands) == 6
    copy = tmp_path / "copy.bundle"
    save_bundle(copy, b.model, b.contract)
    b2 = load_bundle(copy)
    assert b2.hash == b.hash
    x = torch.randn(1, 6, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), b2.model(x))


def test_damaged_or_foreign_files_are_refused(random_bundle, tmp_path):
    raw = bytearray(random_bundle.read_bytes())
    raw[-200] ^= 0xFF
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BundleError):
        load_bundle(bad)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(BundleError, match="not a geoseg bundle"):
        load_bundle(foreign)


def test_band_mismatch_names_the_expected_bands(random_bundle, make_raster):
    import numpy as np

    b = load_bundle(random_bundle)
    b.check_scene(read_profile(SCENE))
    four = make_raster("four.tif", np.ones((4, 8, 8), "uint8"))
    with pytest.raises(
        BandMismatchError, match=r"4 bands, the bundle expects 6 \(b1,b2,b3,b4,b5,b6\)"
    ) as e:
        b.check_scene(read_profile(four))
    assert (e.value.filename, e.value.expected, e.value.found) == (str(four), [1, 2, 3, 4, 5, 6], 4)
