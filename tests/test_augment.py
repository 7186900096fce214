import numpy as np
import pytest

from geoseg.augment import build_augmenter
from geoseg.classes import NODATA
from geoseg.errors import ConfigError


def _scene_like(dtype, bands=6, size=80, seed=0):
    """An image with structure, and a mask derived from its content (class = quantile of band 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = np.sin(xx / 7.0) + np.cos(yy / 11.0) + 0.3 * rng.standard_normal((size, size))
    img = np.stack([base * (b + 1) for b in range(bands)])
    if np.issubdtype(dtype, np.integer):
        img = (img - img.min()) / (img.max() - img.min()) * (np.iinfo(dtype).max // 2)
    img = img.astype(dtype)
    mask = np.digitize(img[0].astype(np.float64), np.quantile(img[0], [0.25, 0.5, 0.75])).astype(
        np.uint8
    )
    return img, mask


def _class_of(img, ref):
    bins = np.quantile(ref[0].astype(np.float64), [0.25, 0.5, 0.75])
    return np.digitize(img[0].astype(np.float64), bins)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("bands", [1, 6, 13])
def test_geometric_augmentation_keeps_image_and_mask_aligned(dtype, bands):
    img, mask = _scene_like(dtype, bands)
    aug = build_augmenter("light", 80, seed=3)
    for _ in range(10):
        out, m = aug(img, mask)
        assert out.dtype == img.dtype and out.shape == img.shape and m.shape == mask.shape
        # the mask still says what the moved image says, pixel for pixel
        np.testing.assert_array_equal(_class_of(out, img), m)


def test_strong_pipeline_crops_to_the_window_keeps_labels_and_never_interpolates_ids():
    aug = build_augmenter("strong", 64, seed=0)
    assert aug.margin == 8
    img, mask = _scene_like(np.float32, 13, size=64 + 2 * aug.margin)
    mask = mask * 3  # class ids 0, 3, 6, 9: an interpolated id would fall between them
    mask[:, :40] = NODATA  # a large unlabelled part
    for _ in range(30):
        out, m = aug(img, mask)
        assert out.shape == (13, 64, 64) and m.shape == (64, 64)
        assert set(np.unique(m)) <= {0, 3, 6, 9, NODATA}
        assert (m != NODATA).any()  # the crop never lands on all-unlabelled pixels


def test_radiometric_transforms_act_per_band_on_the_image_only():
    import albumentations as A

    from geoseg.augment import PerBandBrightnessContrast

    img, mask = _scene_like(np.float32, 4)
    t = A.Compose([PerBandBrightnessContrast(brightness=0.3, contrast=0.3, p=1.0)], seed=1)
    out = t(image=img.transpose(1, 2, 0), mask=mask)
    np.testing.assert_array_equal(out["mask"], mask)
    ratios = out["image"].std((0, 1)) / img.transpose(1, 2, 0).std((0, 1))
    assert len(set(np.round(ratios, 4))) == 4  # each band got its own contrast
    assert np.all((ratios > 0.69) & (ratios < 1.31))


def test_custom_pipeline_from_yaml(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text(
        "margin: 4\n"
        "transforms:\n"
        "  - {name: RandomValidCrop}\n"
        "  - {name: Affine, rotate: [-30, 30], p: 1.0}\n"
        "  - {name: PerBandNoise, std: 0.1}\n"
    )
    aug = build_augmenter(path, 32, seed=0)
    img, mask = _scene_like(np.uint16, 3, size=40)
    out, m = aug(img, mask)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint16
    assert set(np.unique(m)) <= {0, 1, 2, 3, NODATA}  # rotation fills with NODATA, nearest ids


def test_bad_pipelines_say_what_is_valid(tmp_path):
    with pytest.raises(ConfigError, match="none, light, strong"):
        build_augmenter("heavy", 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text("transforms:\n  - {name: Teleport}\n")
    with pytest.raises(ConfigError, match="unknown transform 'Teleport'"):
        build_augmenter(bad, 64)
    bad.write_text("margin: 4\ntransforms:\n  - {name: HorizontalFlip}\n")
    with pytest.raises(ConfigError, match="RandomValidCrop"):
        build_augmenter(bad, 64)
