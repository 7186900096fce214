import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geoseg import load_bundle
from geoseg.bundle import combine_bundles
from geoseg.errors import BandMismatchError, BundleError
from geoseg.io import read_profile
from geoseg.stages.predict import predict_scene

from .conftest import SCENE, make_random_bundle


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


def test_an_ensemble_bundle_predicts_its_members_mean_probabilities(tmp_path):
    """``geoseg ensemble`` makes one bundle of models trained apart: its output's softmax is
    the mean of theirs, and predict runs it as any bundle (the same classes, a map written)."""
    a, b = (make_random_bundle(tmp_path / f"{s}.bundle", 6, 80.0, 30.0, seed=s) for s in (0, 1))
    made = combine_bundles([a, b], tmp_path / "both.bundle")
    both = load_bundle(tmp_path / "both.bundle")
    assert both.contract.members == 2 and both.hash == made.hash
    assert [m["hash"] for m in both.contract.training["members"]] == [
        load_bundle(a).hash,
        load_bundle(b).hash,
    ]
    x = torch.randn(2, 6, 64, 64)
    with torch.inference_mode():
        mean = (load_bundle(a).model(x).softmax(1) + load_bundle(b).model(x).softmax(1)) / 2
        got = both.model(x).softmax(1)
        assert not torch.allclose(load_bundle(a).model(x).softmax(1), mean, atol=1e-3)
    torch.testing.assert_close(got, mean, atol=1e-5, rtol=1e-4)
    r = predict_scene(tmp_path / "both.bundle", SCENE, tmp_path / "map.tif", window=64)
    assert r.valid_pixels > 0


def test_bundles_an_ensemble_cannot_hold_are_refused_in_one_line(tmp_path):
    """Members must read the same bands the same way: bundles normalised differently (trained
    on other scenes) are refused, as are one bundle alone and an output that is an input; no
    output is left behind."""
    a = make_random_bundle(tmp_path / "a.bundle", 6, 80.0, 30.0)
    other = make_random_bundle(tmp_path / "other.bundle", 6, 95.0, 30.0, seed=1)
    out = tmp_path / "both.bundle"
    with pytest.raises(BundleError, match=r"differ in mean; .* another --seed"):
        combine_bundles([a, other], out)
    with pytest.raises(BundleError, match="at least two bundles"):
        combine_bundles([a], out)
    before = a.read_bytes()
    with pytest.raises(BundleError, match="is one of its bundles"):
        combine_bundles([a, other], a, overwrite=True)
    assert a.read_bytes() == before and not out.exists()
    geoseg = str(Path(sys.executable).with_name("geoseg"))
    run = subprocess.run(
        [geoseg, "ensemble", str(a), str(other), "-o", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 1 and not out.exists()
    assert run.stderr.startswith("geoseg: error: bundles ") and run.stderr.count("\n") == 1
    twin = make_random_bundle(tmp_path / "twin.bundle", 6, 80.0, 30.0, seed=2)
    run = subprocess.run(
        [geoseg, "ensemble", str(a), str(twin), "-o", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {out}: an ensemble of 2 unet models"
    assert load_bundle(out).contract.members == 2
