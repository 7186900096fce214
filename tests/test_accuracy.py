"""Accuracy a map producer can publish: the good-practice estimators against the published
worked examples and against an implementation written here from the formulas, on the NC
scene's 1000 real reference points; stratified samples drawn from a class map; bootstrap
intervals over blocks; and the bad inputs, each one line."""

from __future__ import annotations

import json
import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.accuracy import Z95, allocate, estimate
from geoseg.cli import cli
from geoseg.errors import ConfigError
from geoseg.io import read_class_metadata
from geoseg.stages.evaluate import evaluate
from geoseg.stages.sample import sample
from geoseg.tasks.strata import pixel_areas

from .conftest import EAST, LABELS, REGIONS, shared

POINTS = "nc-landsat7-landclass96/landsat96_points.shp"
OLOFSSON = ["deforestation", "forest gain", "stable forest", "stable non-forest"]


def olofsson_table8():
    """Olofsson et al. (2014), table 8: sample counts (rows map, columns reference) and the
    mapped areas in 30 m pixels."""
    counts = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
    pixels = np.array([200_000, 150_000, 3_200_000, 6_450_000])
    mapped, reference = [], []
    for i in range(4):
        for j in range(4):
            mapped += [i + 1] * counts[i, j]
            reference += [j + 1] * counts[i, j]
    return counts, pixels, np.array(mapped), np.array(reference)


def test_the_worked_example_of_olofsson_2014_to_the_published_digits():
    _, pixels, mapped, reference = olofsson_table8()
    area = {i + 1: float(p) * 900.0 for i, p in enumerate(pixels)}
    e = estimate(mapped, mapped, reference, area, list(enumerate(OLOFSSON, 1)), area)
    # p. 54: user's, producer's and overall accuracy with their 95 % intervals
    assert [round(c.users.value, 2) for c in e.per_class] == [0.88, 0.73, 0.93, 0.96]
    assert [round(c.users.half_width, 2) for c in e.per_class] == [0.07, 0.10, 0.04, 0.02]
    assert [round(c.producers.value, 2) for c in e.per_class] == [0.75, 0.85, 0.93, 0.96]
    assert round(e.overall.value, 2) == 0.95 and round(e.overall.half_width, 2) == 0.02
    # p. 54: the error-adjusted areas in ha with their 95 % intervals (the paper rounds the
    # standard error before multiplying: 16,282 ha against 16,281.4 here)
    adjusted = [c.area_m2.value / 1e4 for c in e.per_class]
    assert [round(a) for a in adjusted] == [21_158, 11_686, 285_770, 581_386]
    half = [c.area_m2.half_width / 1e4 for c in e.per_class]
    assert np.allclose(half, [6_158, 3_756, 15_510, 16_282], atol=1.0)
    # the mapped areas are the pixel counts times 900 m²
    assert [c.mapped_area_m2 for c in e.per_class] == [p * 900.0 for p in pixels]


def test_the_numerical_example_of_stehman_2014_strata_that_are_not_the_map_classes():
    """Stehman (2014), section 3: 40 points in 4 strata of 40,000, 30,000, 20,000 and 10,000
    pixels, map and reference classes A-D that differ from the strata."""
    s = list("A" * 10 + "B" * 10 + "C" * 10 + "D" * 10)
    m = list("A" * 7 + "B" * 3 + "A" + "B" * 11 + "C" * 6 + "BB" + "D" * 10)
    r = list("AAAAACBABC" + "A" + "BBBBB" + "AABB" + "CCCCC" + "DDBBA" + "DDDDDDD" + "CCB")
    code = {k: i + 1 for i, k in enumerate("ABCD")}
    strata = {1: 40_000.0, 2: 30_000.0, 3: 20_000.0, 4: 10_000.0}
    e = estimate(
        [code[v] for v in s],
        [code[v] for v in m],
        [code[v] for v in r],
        strata,
        [(i + 1, k) for i, k in enumerate("ABCD")],
        {},
    )
    a, b, c = e.per_class[0], e.per_class[1], e.per_class[2]
    # pp. 4932-4936 of the paper
    assert round(a.area_share.value, 2) == 0.35 and round(c.area_share.value, 2) == 0.20
    assert round(e.overall.value, 2) == 0.63
    assert round(b.users.value, 3) == 0.574 and round(b.producers.value, 3) == 0.794
    assert round(e.error_matrix[1][2], 2) == 0.08
    assert round(a.area_share.se, 3) == 0.082 and round(c.area_share.se, 3) == 0.064
    assert round(e.overall.se, 3) == 0.085
    assert round(b.users.se, 3) == 0.125 and round(b.producers.se, 3) == 0.117


def olofsson_by_hand(mapped, reference, pixels_by_class, pixel_m2, ids):
    """The estimators as Olofsson et al. (2014) write them (eqs. 2-11), strata = map classes."""
    k = len(ids)
    n = np.array([[np.sum((mapped == i) & (reference == j)) for j in ids] for i in ids], float)
    ni = n.sum(1)
    area = np.array([pixels_by_class.get(i, 0) for i in ids], float) * pixel_m2
    keep = ni > 0  # strata without a point are left out, as geoseg does
    w = np.where(keep, area, 0) / area[keep].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(keep[:, None], w[:, None] * n / ni[:, None], 0)
        oa = np.trace(p)
        ua = np.diag(p) / p.sum(1)
        pa = np.diag(p) / p.sum(0)
        # a stratum with no correct point adds nothing (as in t2 below: the convention for a
        # quantity that is zero at every point of a stratum); else one point: NaN
        v_oa = np.sum(np.where(keep & (np.diag(n) > 0), w**2 * ua * (1 - ua) / (ni - 1), 0))
        v_ua = ua * (1 - ua) / (ni - 1)
        n_hat = (
            np.where(keep, area, 0)[:, None] * np.where(keep[:, None], n / ni[:, None], 0)
        ).sum(0)
        big_n = np.where(keep, area, 0)
        v_pa = np.zeros(k)
        for j in range(k):
            t1 = big_n[j] ** 2 * (1 - pa[j]) ** 2 * ua[j] * (1 - ua[j]) / (ni[j] - 1)
            t2 = sum(  # a stratum with no point of reference class j adds nothing
                big_n[i] ** 2 * n[i, j] / ni[i] * (1 - n[i, j] / ni[i]) / (ni[i] - 1)
                for i in range(k)
                if i != j and keep[i] and n[i, j] > 0
            )
            # as in t2, a stratum with no point of reference class j adds nothing, also when it
            # is class j's own stratum; otherwise a stratum of one point: no variance, NaN
            t1 = t1 if keep[j] and n[j, j] > 0 else 0.0
            v_pa[j] = (t1 + pa[j] ** 2 * t2) / n_hat[j] ** 2
        share = p.sum(0)
        se_share = np.sqrt(
            [
                np.sum(np.where(keep & (n[:, j] > 0), (w * p[:, j] - p[:, j] ** 2) / (ni - 1), 0))
                for j in range(k)
            ]
        )
    return {
        "oa": oa,
        "se_oa": math.sqrt(v_oa),
        "ua": ua,
        "se_ua": np.sqrt(v_ua),
        "pa": pa,
        "se_pa": np.sqrt(v_pa),
        "area": share * area[keep].sum(),
        "se_area": se_share * area[keep].sum(),
        "matrix": p,
    }


def _nc_points_by_hand(points, class_map, regions=None):
    """The NC reference points read, located and estimated here: per point the map class
    under it (rasterio's sample), the class areas counted with numpy on the whole map."""
    with rasterio.open(class_map) as src:
        classes = read_class_metadata(src)
        data = src.read(1)
        pixel_m2 = abs(src.transform.a * src.transform.e)
        gdf = gpd.read_file(points).to_crs(src.crs)
        xy = [(g.x, g.y) for g in gdf.geometry]
        r, c = rasterio.transform.rowcol(src.transform, *zip(*xy))
        r, c = np.asarray(r), np.asarray(c)
        inside = (r >= 0) & (r < src.height) & (c >= 0) & (c < src.width)
        mapped = np.full(len(gdf), -1)
        mapped[inside] = data[r[inside], c[inside]]
        valid_map = data != src.nodata
    by_name = {k.name: k.id for k in classes}
    reference = np.array([by_name[v] for v in gdf["label"]])
    use = inside & (mapped != 0)
    ids = [k.id for k in classes]
    out = {}
    masks = {"(all)": np.ones_like(valid_map)}
    point_masks = {"(all)": np.ones(len(gdf), bool)}
    if regions is not None:
        from rasterio.features import geometry_mask

        reg = gpd.read_file(regions).to_crs(gdf.crs)
        for _, row in reg.iterrows():
            masks[row["name"]] = ~geometry_mask([row.geometry], data.shape, src.transform)
            point_masks[row["name"]] = gdf.geometry.intersects(row.geometry).to_numpy()
    for name, mask in masks.items():
        px = {i: int(np.sum((data == i) & valid_map & mask)) for i in ids}
        sel = use & point_masks[name]
        out[name] = olofsson_by_hand(mapped[sel], reference[sel], px, pixel_m2, ids)
    return out, int(np.sum(~inside))


def _same(mine, theirs, rel=False):
    """geoseg's figure equals the formula's; ``None`` where the formula gives no number (a
    stratum of one point has no variance)."""
    if mine is None:
        return not np.isfinite(theirs)
    scale = max(abs(theirs), 1.0) if rel else 1.0
    return abs(mine - theirs) / scale < 1e-9


def _compare(est, hand):
    assert _same(est.overall.value, hand["oa"]) and _same(est.overall.se, hand["se_oa"])
    for j, c in enumerate(est.per_class):
        assert _same(c.users.value, hand["ua"][j]) and _same(c.users.se, hand["se_ua"][j])
        assert _same(c.producers.value, hand["pa"][j])
        assert _same(c.producers.se, hand["se_pa"][j])
        assert _same(c.area_m2.value, hand["area"][j], rel=True)
        if c.sample_reference == 0:  # no point of the class: 0, and no interval (not "± 0")
            assert c.area_m2.value == 0 and c.area_m2.se is None
        else:
            assert _same(c.area_m2.se, hand["se_area"][j], rel=True)
    assert np.allclose(est.error_matrix, hand["matrix"], atol=1e-12, rtol=0)


def test_nc_reference_points_give_the_formulas_numbers_overall_and_per_region(
    tmp_path, dask_client
):
    """The 1000 points of the NC scene (1996 land classes, by name) against the 1996 class map,
    strata = its classes: geoseg's estimates equal the formulas' to 1e-9, for the whole map
    and for each of four regions with the region's own strata areas; the 115 points outside
    the map are counted, not silently dropped."""
    points = shared(POINTS)
    report = evaluate(
        LABELS,
        points,
        tmp_path / "points.json",
        truth_field="label",
        regions=REGIONS,
        block=128,
        client=dask_client,
    )
    hand, outside = _nc_points_by_hand(points, LABELS, REGIONS)
    assert outside == 115
    assert report.sample is not None
    assert report.sample_points == "885 of 1000 points used; not used: 115 outside the map"
    _compare(report.sample, hand["(all)"])
    assert [r.name for r in report.sample_regions] == [n for n in hand if n != "(all)"]
    for r in report.sample_regions:
        _compare(r, hand[r.name])
    saved = json.loads((tmp_path / "points.json").read_text())
    assert saved["sample"]["overall_accuracy"]["value"] == report.sample.overall.value
    assert saved["sample"]["overall_accuracy"]["ci95_low"] == pytest.approx(
        hand["(all)"]["oa"] - Z95 * hand["(all)"]["se_oa"], abs=1e-12
    )


def test_points_in_another_crs_are_reprojected_and_give_the_same_estimates(tmp_path, dask_client):
    gdf = gpd.read_file(shared(POINTS))
    moved = tmp_path / "points_wgs84.gpkg"
    gdf.to_crs(4326).to_file(moved)
    a = evaluate(LABELS, shared(POINTS), truth_field="label", client=dask_client).sample
    b = evaluate(LABELS, moved, truth_field="label", client=dask_client).sample
    assert a is not None and b is not None and b.points == a.points
    assert b.overall.value == pytest.approx(a.overall.value, abs=1e-12)
    assert [c.area_m2.value for c in b.per_class] == pytest.approx(
        [c.area_m2.value for c in a.per_class], rel=1e-12
    )


def test_a_drawn_sample_follows_its_allocation_and_does_not_depend_on_blocks_or_workers(
    nc_run, tmp_path, dask_client
):
    """geoseg sample on a real predicted map: every stratum gets its allocated points, each at
    a pixel centre of its class, inside the map; the design's pixel counts equal numpy's; the
    same seed gives the same points for another block size, another seed other points."""

    def draw(name, **kw):
        return sample(
            nc_run["classes"], tmp_path / name, size=300, min_per_class=20, client=dask_client, **kw
        )

    a, b, c = draw("a.gpkg", block=128), draw("b.gpkg", block=256), draw("c.gpkg", seed=7)
    pa, pb, pc = (gpd.read_file(r.points) for r in (a, b, c))
    assert len(pa) == 300
    assert pa.geometry.equals(pb.geometry)
    assert not pa.geometry.equals(pc.geometry)
    assert pa["reference"].isna().all()
    design = json.loads(a.design.read_text())
    with rasterio.open(nc_run["classes"]) as src:
        data, t = src.read(1), src.transform
        nodata = src.nodata
    for s in design["strata"]:
        assert s["pixels"] == int(np.sum(data == s["code"]))
        assert s["area_m2"] == pytest.approx(s["pixels"] * abs(t.a * t.e))
        got = int(np.sum(pa["stratum"] == s["code"]))
        assert got == s["points"] and got >= min(20, s["pixels"])
    counts = [s["points"] for s in design["strata"]]
    areas = [s["area_m2"] for s in design["strata"]]
    assert counts == allocate(
        300, areas, min_per_class=20, pixels=[s["pixels"] for s in design["strata"]]
    )
    cols, rows = ~t * (pa.geometry.x.to_numpy(), pa.geometry.y.to_numpy())
    assert np.allclose(cols % 1, 0.5) and np.allclose(rows % 1, 0.5)
    under = data[rows.astype(int), cols.astype(int)]
    assert (under == pa["map_class"].to_numpy()).all() and (under != nodata).all()
    assert len({(r, c) for r, c in zip(rows, cols)}) == 300  # without replacement


def test_a_sample_labelled_from_another_map_is_estimated_with_its_design(
    nc_run, tmp_path, dask_client
):
    """The whole loop: draw from the predicted map, label the points with the 1996 land classes
    (the reference), estimate with the design found beside the points; the estimate equals the
    formulas' on the same points, and a design file of another map is refused."""
    drawn = sample(
        nc_run["classes"], tmp_path / "s.gpkg", size=200, min_per_class=10, client=dask_client
    )
    pts = gpd.read_file(drawn.points)
    with rasterio.open(LABELS) as src:
        names = {c.id: c.name for c in read_class_metadata(src)}
        ref = [v[0] for v in src.sample([(g.x, g.y) for g in pts.geometry])]
    pts["reference"] = [names.get(int(v)) for v in ref]  # names; 0 (no label) stays empty
    labelled = tmp_path / "s_labelled.gpkg"
    pts.to_file(labelled)
    (tmp_path / "s_labelled.design.json").write_text(drawn.design.read_text())
    report = evaluate(nc_run["classes"], labelled, truth_field="reference", client=dask_client)
    est = report.sample
    assert est is not None and "strata of" in est.design
    with rasterio.open(nc_run["classes"]) as src:
        data = src.read(1)
        px = abs(src.transform.a * src.transform.e)
        ids = [c.id for c in read_class_metadata(src)]
    keep = pts["reference"].notna().to_numpy()
    by_name = {v: k for k, v in names.items()}
    hand = olofsson_by_hand(
        pts["map_class"].to_numpy()[keep],
        np.array([by_name[v] for v in pts["reference"][keep]]),
        {i: int(np.sum(data == i)) for i in ids},
        px,
        ids,
    )
    _compare(est, hand)
    assert f"{int(keep.sum())} of 200 points used" in report.sample_points
    with pytest.raises(ConfigError, match="belongs to another map"):
        evaluate(
            LABELS, labelled, truth_field="reference", design_file=drawn.design, client=dask_client
        )


def test_strata_from_another_raster_use_stehmans_estimator(nc_run, tmp_path, dask_client):
    """Points whose strata are the classes of another map (the 1996 map) estimate the
    predicted map with those strata: the result equals Stehman's formulas written here."""
    points = shared(POINTS)
    rep = evaluate(
        nc_run["classes"], points, truth_field="label", strata=LABELS, client=dask_client
    )
    est = rep.sample
    assert est is not None and "strata: " in est.design
    with rasterio.open(LABELS) as s_src, rasterio.open(nc_run["classes"]) as m_src:
        strata, mp = s_src.read(1), m_src.read(1)
        gdf = gpd.read_file(points).to_crs(m_src.crs)
        r, c = rasterio.transform.rowcol(m_src.transform, gdf.geometry.x, gdf.geometry.y)
        r, c = np.asarray(r), np.asarray(c)
        names = {k.name: k.id for k in read_class_metadata(m_src)}
        valid = mp != m_src.nodata
        nodata = m_src.nodata
        px = abs(m_src.transform.a * m_src.transform.e)
    inside = (r >= 0) & (r < mp.shape[0]) & (c >= 0) & (c < mp.shape[1])
    h = np.where(inside, strata[np.clip(r, 0, mp.shape[0] - 1), np.clip(c, 0, mp.shape[1] - 1)], -1)
    m = np.where(inside, mp[np.clip(r, 0, mp.shape[0] - 1), np.clip(c, 0, mp.shape[1] - 1)], -1)
    y_ref = np.array([names[v] for v in gdf["label"]])
    use = inside & (h > 0) & (m != nodata)  # 0: no 1996 class; nodata: nothing mapped
    h, m, y_ref = h[use], m[use], y_ref[use]
    codes = sorted(set(h.tolist()))
    n_h = {k: np.sum(h == k) for k in codes}
    area = {k: np.sum((strata == k) & valid) * px for k in codes}
    total = sum(area.values())

    def stehman(y, x=None):
        ybar = {k: y[h == k].mean() for k in codes}
        if x is None:
            val = sum(area[k] * ybar[k] for k in codes) / total
            var = sum(area[k] ** 2 * y[h == k].var(ddof=1) / n_h[k] for k in codes) / total**2
            return val, math.sqrt(var)
        xbar = {k: x[h == k].mean() for k in codes}
        big_x = sum(area[k] * xbar[k] for k in codes)
        ratio = sum(area[k] * ybar[k] for k in codes) / big_x
        var = (
            sum(
                area[k] ** 2
                * (
                    y[h == k].var(ddof=1)
                    + ratio**2 * x[h == k].var(ddof=1)
                    - 2 * ratio * np.cov(x[h == k], y[h == k])[0, 1]
                )
                / n_h[k]
                for k in codes
            )
            / big_x**2
        )
        return ratio, math.sqrt(max(var, 0.0))  # rounding can take a zero below 0

    oa, se = stehman((m == y_ref).astype(float))
    assert abs(est.overall.value - oa) < 1e-9 and abs(est.overall.se - se) < 1e-9
    for cls in est.per_class:
        on_map, in_ref = (m == cls.id).astype(float), (y_ref == cls.id).astype(float)
        if on_map.sum() >= 1 and cls.users.se is not None:
            u, su = stehman(on_map * in_ref, on_map)
            assert abs(cls.users.value - u) < 1e-9 and abs(cls.users.se - su) < 1e-9
        if in_ref.sum() >= 1 and cls.producers.se is not None:
            p, sp = stehman(on_map * in_ref, in_ref)
            assert abs(cls.producers.value - p) < 1e-9 and abs(cls.producers.se - sp) < 1e-9
        a, sa = stehman(in_ref)
        assert abs(cls.area_share.value - a) < 1e-9 and abs(cls.area_share.se - sa) < 1e-9


def test_simple_random_design_is_one_stratum(dask_client):
    points = shared(POINTS)
    rep = evaluate(LABELS, points, truth_field="label", design="simple", client=dask_client)
    est = rep.sample
    assert est is not None and est.design == "simple random" and len(est.strata) == 1
    ok = np.array([c.sample_mapped for c in est.per_class]).sum()
    assert ok == 885
    # the overall accuracy of a simple random sample is the share of agreeing points
    agree = np.trace(np.asarray(rep.overall.confusion_matrix))
    assert est.overall.value == pytest.approx(agree / 885, abs=1e-12)
    p = agree / 885
    assert est.overall.se == pytest.approx(math.sqrt(p * (1 - p) / 884), abs=1e-12)


def test_design_simple_on_the_command_line(tmp_path):
    out = tmp_path / "simple.json"
    r = invoke("evaluate", LABELS, shared(POINTS), "--truth-field", "label", "--design",
               "simple", "-o", out, "--workers", "1")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    saved = json.loads(out.read_text())["sample"]
    assert saved["design"] == "simple random" and len(saved["strata"]) == 1
    assert "885 of 1000 points used" in r.stdout and "overall accuracy" in r.stdout


def test_a_class_without_a_reference_point_has_an_area_of_zero_and_no_interval():
    area = {1: 100.0, 2: 50.0}
    e = estimate([1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 1], area, [(1, "a"), (2, "b"), (3, "c")],
                 area)  # fmt: skip
    c = e.per_class[2]
    assert c.area_share.value == 0.0 and c.area_share.se is None and c.area_share.low is None
    assert "no sample point" in c.area_share.note and c.users.value is None


def test_a_stratum_of_one_point_gives_the_formulas_answer_right_or_wrong():
    """Found when a test map trained at new defaults held a class with one drawn point, and
    that point wrong: geoseg gave the overall accuracy a standard error, the formulas written
    out by hand gave NaN (0/0). One convention for both: a stratum of one point has no
    variance where the quantity occurs in it (its point right: no interval), and adds nothing
    where it does not (its point wrong), as a stratum without a point of a class adds nothing
    to that class's area."""
    area = {1: 100.0, 2: 50.0, 3: 10.0}
    classes = [(1, "a"), (2, "b"), (3, "c")]
    for ref3, has_se in ((3, False), (1, True)):  # the single point of stratum 3 right, wrong
        m, r = [1, 1, 1, 2, 2, 3], [1, 1, 2, 2, 1, ref3]
        e = estimate(m, m, r, area, classes, area)
        hand = olofsson_by_hand(np.array(m), np.array(r), area, 1.0, [1, 2, 3])
        _compare(e, hand)
        assert (e.overall.se is not None) == has_se
        assert any("single point" in n for n in e.notes)
        # the estimate says itself which stratum left it without an interval
        assert e.overall.note == (
            None if has_se else "strata [3] hold a single point: no standard error"
        )


def test_geodesic_pixel_areas_in_a_geographic_crs():
    """A 0.01° pixel's area on the WGS 84 ellipsoid, per row, against the closed form for a
    cell between two parallels (from the authalic latitude's q function), to 1e-6."""
    from affine import Affine
    from rasterio.crs import CRS

    a, f = 6378137.0, 1 / 298.257223563
    e = math.sqrt(f * (2 - f))
    b = a * (1 - f)

    def q(phi):
        s = math.sin(math.radians(phi))
        return s / (1 - e * e * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)

    t = Affine(0.01, 0, 10.0, 0, -0.01, 60.0)
    got = pixel_areas(t, CRS.from_epsg(4326), 0, 3)
    for row in range(3):
        top, bottom = 60.0 - 0.01 * row, 60.0 - 0.01 * (row + 1)
        exact = math.radians(0.01) * b * b / 2 * (q(top) - q(bottom))
        assert got[row] == pytest.approx(exact, rel=1e-6)
    assert got[0] < got[1] < got[2]  # rows nearer the equator hold more area


def test_bootstrap_over_blocks_gives_seeded_intervals_around_the_scores(
    nc_run, tmp_path, dask_client
):
    a = evaluate(
        nc_run["classes"],
        LABELS,
        tmp_path / "b.md",
        within=EAST,
        bootstrap=200,
        block=128,
        client=dask_client,
    )
    b = evaluate(
        nc_run["classes"], LABELS, within=EAST, bootstrap=200, block=128, client=dask_client
    )
    iv = a.intervals
    assert iv is not None and iv.to_dict() == b.intervals.to_dict()
    # the blocks resampled: those of the 4 x 4 blocks of 128 px that hold scored pixels
    from rasterio.features import geometry_mask

    with rasterio.open(nc_run["classes"]) as src, rasterio.open(LABELS) as lab:
        pred, truth = src.read(1), lab.read(1)
        east = ~geometry_mask(
            gpd.read_file(EAST).to_crs(src.crs).geometry, pred.shape, src.transform
        )
        scored = east & (truth > 0) & (pred != src.nodata)
    held = sum(
        bool(scored[r : r + 128, c : c + 128].any())
        for r in range(0, pred.shape[0], 128)
        for c in range(0, pred.shape[1], 128)
    )
    assert iv.overall.blocks == held and held >= 2
    assert iv.overall.miou.low <= a.overall.miou <= iv.overall.miou.high
    assert iv.overall.overall_accuracy.low < iv.overall.overall_accuracy.high
    assert (
        f"bootstrap over blocks: 200 resamples of {held} blocks" in (tmp_path / "b.md").read_text()
    )
    evaluate(nc_run["classes"], LABELS, tmp_path / "b.html", within=EAST, bootstrap=200,
             block=128, client=dask_client)  # fmt: skip
    page = (tmp_path / "b.html").read_text()
    low, high = iv.overall.iou[4].low, iv.overall.iou[4].high  # forest
    assert "<th>IoU 95 %</th>" in page and f"{low:.3f}-{high:.3f}" in page


def invoke(*args):
    return CliRunner().invoke(
        cli, [str(a) for a in args], prog_name="geoseg", catch_exceptions=False
    )


def one_line(result, *needles):
    assert result.exit_code == 1, result.output
    # the progress of work done before the error was found (counting strata) may precede it
    lines = [x for x in result.stderr.strip().splitlines() if "] " not in x or "error" in x]
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_get_one_line_and_leave_nothing(tmp_path):
    points = shared(POINTS)
    out = tmp_path / "s.gpkg"
    # 7 strata x 100 points do not fit in 600
    one_line(
        invoke("sample", LABELS, "-o", out, "--size", "600", "--min-per-class", "100"),
        "600 points cannot give 7 strata 100 points each",
        "--size",
    )
    assert not out.exists() and not (tmp_path / "s.design.json").exists()
    one_line(
        invoke("evaluate", LABELS, points, "--truth-field", "nope", "-o", tmp_path / "r.json"),
        "has no field 'nope'",
        "label",
    )
    moved = tmp_path / "odd.gpkg"
    g = gpd.read_file(points)
    g["label"] = g["label"].replace({"forest": "woods", "water": "lake"})
    g.to_file(moved)
    one_line(
        invoke("evaluate", LABELS, moved, "--truth-field", "label", "-o", tmp_path / "r.json"),
        "['lake', 'woods'] match no class",
        "5 forest",
        "--class-map",
    )
    # and --class-map by name fixes it
    ok = invoke(
        "evaluate",
        LABELS,
        moved,
        "--truth-field",
        "label",
        "-o",
        tmp_path / "r.json",
        "--class-map",
        "woods:5,lake:6",
        "--workers",
        "1",
    )
    assert ok.exit_code == 0, ok.output
    one_line(
        invoke("evaluate", LABELS, LABELS, "-o", tmp_path / "x.json", "--bootstrap", "100"),
        "--bootstrap 100",
        "--block",
    )
    assert not (tmp_path / "x.json").exists()
    empty = tmp_path / "unlabelled.gpkg"
    g["label"] = None
    g.to_file(empty)
    one_line(
        invoke("evaluate", LABELS, empty, "--truth-field", "label", "-o", tmp_path / "y.json"),
        "no point can be used",
        "without a reference label",
    )
    assert not (tmp_path / "y.json").exists()


def test_reports_show_intervals_and_areas(tmp_path, dask_client):
    points = shared(POINTS)
    for ext in ("md", "html", "csv"):
        evaluate(LABELS, points, tmp_path / f"r.{ext}", truth_field="label", client=dask_client)
    md = (tmp_path / "r.md").read_text()
    assert "overall accuracy: 0.921 ±" in md and "| 5 forest | 0.942 ±" in md
    html = (tmp_path / "r.html").read_text()
    assert "adjusted area with its 95 % interval" in html and "<svg" in html
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("region,class_id,class_name,users_accuracy,users_se")
    assert len(rows) == 1 + 7


def test_samples_estimate_the_dense_truths_figures_without_bias(nc_run, tmp_path, dask_client):
    """Where the truth is known everywhere, the sample-based estimates must find it: over 30
    seeds, 200-point samples of the predicted NC map, labelled from the 1996 map, give overall
    accuracies and forest areas whose mean lies within 3 standard errors of the dense figures,
    and whose 95 % intervals hold the dense figure in most draws."""
    dense = evaluate(nc_run["classes"], LABELS, client=dask_client)
    true_oa = dense.overall.overall_accuracy
    with rasterio.open(LABELS) as src:
        truth = src.read(1)
        transform = src.transform
    with rasterio.open(nc_run["classes"]) as src:
        mapped = src.read(1)
        valid = (mapped != src.nodata) & (truth > 0)
    # the forest area the map's valid, labelled pixels truly hold
    true_forest = np.sum((truth == 5) & valid) * abs(transform.a * transform.e)
    oa, forest, held_oa, held_forest = [], [], 0, 0
    seeds = 30
    for seed in range(seeds):
        drawn = sample(
            nc_run["classes"],
            tmp_path / f"s{seed}.gpkg",
            size=200,
            min_per_class=10,
            seed=seed,
            client=dask_client,
        )
        pts = gpd.read_file(drawn.points)
        cols, rows = ~transform * (pts.geometry.x.to_numpy(), pts.geometry.y.to_numpy())
        ref = truth[rows.astype(int), cols.astype(int)]
        pts["reference"] = [str(v) if v > 0 else None for v in ref]
        labelled = tmp_path / f"l{seed}.gpkg"
        pts.to_file(labelled)
        (tmp_path / f"l{seed}.design.json").write_text(drawn.design.read_text())
        est = evaluate(nc_run["classes"], labelled, truth_field="reference", client=dask_client)
        s = est.sample
        f = s.per_class[4].area_m2  # forest
        oa.append(s.overall.value)
        forest.append(f.value)
        # a draw whose strata keep a single labelled point has no interval: not held
        held_oa += s.overall.low is not None and s.overall.low <= true_oa <= s.overall.high
        held_forest += f.low <= true_forest <= f.high
    # (the estimates cover the map's labelled pixels: the points on unlabelled pixels are
    # left out, as their area is in so small a share)
    assert abs(np.mean(oa) - true_oa) < 3 * np.std(oa) / math.sqrt(seeds)
    assert abs(np.mean(forest) - true_forest) < 3 * np.std(forest) / math.sqrt(seeds)
    assert held_oa >= 0.8 * seeds and held_forest >= 0.8 * seeds


def test_strata_crossed_with_regions(nc_run, tmp_path, dask_client):
    """``--regions``: a stratum per class in each region (and for the pixels in no region); its
    pixel counts equal numpy's over the rasterized regions, each point lies in its stratum's
    region and class, and the labelled sample is estimated with those strata."""
    from rasterio.features import geometry_mask

    drawn = sample(
        nc_run["classes"],
        tmp_path / "r.gpkg",
        size=400,
        min_per_class=5,
        regions=REGIONS,
        client=dask_client,
    )
    design = json.loads(drawn.design.read_text())
    pts = gpd.read_file(drawn.points)
    regions = gpd.read_file(REGIONS)
    with rasterio.open(nc_run["classes"]) as src:
        data, t, nodata = src.read(1), src.transform, src.nodata
        regions = regions.to_crs(src.crs)
    slot = np.zeros(data.shape, int)
    for i in range(len(regions) - 1, -1, -1):  # the first region that holds a pixel
        slot[~geometry_mask([regions.geometry.iloc[i]], data.shape, t)] = i + 1
    names = ["(no region)", *regions["name"]]
    for s in design["strata"]:
        region, cls = divmod(s["code"], 1 << 16)
        assert s["pixels"] == int(np.sum((slot == region) & (data == cls) & (data != nodata)))
        assert s["name"].startswith(names[region] + " / ")
    cols, rows = ~t * (pts.geometry.x.to_numpy(), pts.geometry.y.to_numpy())
    r, c = rows.astype(int), cols.astype(int)
    assert (pts["stratum"].to_numpy() == slot[r, c] * (1 << 16) + data[r, c]).all()
    with rasterio.open(LABELS) as src:
        ref = [v[0] for v in src.sample([(g.x, g.y) for g in pts.geometry])]
    pts["reference"] = [str(v) if v else None for v in ref]
    pts.to_file(tmp_path / "r_labelled.gpkg")
    (tmp_path / "r_labelled.design.json").write_text(drawn.design.read_text())
    est = evaluate(
        nc_run["classes"], tmp_path / "r_labelled.gpkg", truth_field="reference", client=dask_client
    ).sample
    assert est is not None and len(est.strata) == len(design["strata"])
    # stratified by region and class, the whole map's area shares still sum to one
    assert sum(c.area_share.value for c in est.per_class) == pytest.approx(1.0)
