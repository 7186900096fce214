import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from geoseg.errors import ConfigError
from geoseg.tiling import WindowGrid, axis_starts, block_windows

sizes = st.integers(min_value=1, max_value=300)


@given(h=sizes, w=sizes, block=st.integers(1, 128))
@settings(max_examples=60, deadline=None)
def test_block_cores_tile_the_scene_exactly(h, w, block):
    cover = np.zeros((h, w), dtype=int)
    for core in block_windows(h, w, block):
        r, c = int(core.row_off), int(core.col_off)
        cover[r : r + int(core.height), c : c + int(core.width)] += 1
    assert (cover == 1).all()


@given(n=sizes, window=st.integers(1, 128), data=st.data())
@settings(max_examples=100, deadline=None)
def test_window_starts_cover_the_axis_and_stay_inside(n, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    starts = axis_starts(n, window, window - overlap)
    covered = np.zeros(starts.max() + window, dtype=bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:n].all()
    stride = window - overlap
    assert starts[0] == 0 and (starts % stride == 0).all()  # one phase for every window
    assert starts.max() + window - n < max(stride, window)  # no window wholly past the end
    assert (np.diff(starts) == stride).all()


@given(h=sizes, w=sizes, window=st.integers(4, 96), block=st.integers(8, 160), data=st.data())
@settings(max_examples=60, deadline=None)
def test_each_pixel_sees_the_same_windows_whatever_the_block(h, w, window, block, data):
    """The property that makes the class map independent of the block size: a block runs
    every grid window that touches any of its pixels."""
    overlap = data.draw(st.integers(0, window - 1))
    grid = WindowGrid(h, w, window, overlap)
    everything = {(int(x.row_off), int(x.col_off)) for x in grid.windows_for(Window(0, 0, w, h))}
    assert len(everything) == grid.n_windows
    for core in block_windows(h, w, block):
        mine = {(int(x.row_off), int(x.col_off)) for x in grid.windows_for(core)}
        r0, c0 = int(core.row_off), int(core.col_off)
        r1, c1 = r0 + int(core.height), c0 + int(core.width)
        touching = {
            (r, c)
            for r, c in everything
            if r < r1 and r + window > r0 and c < c1 and c + window > c0
        }
        assert mine == touching
        halo = grid.halo_window(core)
        assert halo.row_off <= r0 and halo.col_off <= c0
        assert halo.row_off + halo.height >= r1 and halo.col_off + halo.width >= c1


def test_bad_grid_settings_say_what_is_valid():
    with pytest.raises(ConfigError, match="less than the window"):
        WindowGrid(100, 100, 64, 64)
    with pytest.raises(ConfigError, match="block size must be positive"):
        block_windows(10, 10, 0)


@given(h=sizes, w=sizes, window=st.integers(4, 96), block=st.integers(8, 200), data=st.data())
@settings(max_examples=60, deadline=None)
def test_trim_plateaus_give_each_pixel_one_window_and_each_window_one_block(
    h, w, window, block, data
):
    overlap = data.draw(st.integers(0, window - 1))
    grid = WindowGrid(h, w, window, overlap, trim=True)
    owners = np.zeros((h, w), dtype=int)
    runs: dict[tuple[int, int], int] = {}
    cover = np.zeros((h, w), dtype=int)
    for core in grid.blocks(block):
        r0, c0 = int(core.row_off), int(core.col_off)
        cover[r0 : r0 + int(core.height), c0 : c0 + int(core.width)] += 1
        for win in grid.windows_for(core):
            key = (int(win.row_off), int(win.col_off))
            runs[key] = runs.get(key, 0) + 1
            wts = grid.weights(win)
            assert set(np.unique(wts)) <= {0.0, 1.0}
            r, c = key
            part = owners[max(r, 0) : r + window, max(c, 0) : c + window]
            part += wts[: part.shape[0], : part.shape[1]].astype(int)
    assert (cover == 1).all()  # the snapped cores still tile the scene
    assert (owners == 1).all()  # every pixel from exactly one window
    assert set(runs.values()) == {1} and len(runs) == grid.n_windows  # each window run once
