"""What the benchmarks share: appending figures, with the date and machine, to
results/NAME.json; the peak memory of a process and its children; large class maps made from the
real NC land-cover map."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
from rasterio.windows import Window

from geoseg.allocator import WORKER_MALLOC_ENV
from geoseg.classes import ClassInfo
from geoseg.io import write_class_metadata
from geoseg.pipeline import demo_workflow

RESULTS = Path(__file__).parent / "results"
# the repository's root, for the test helpers the benchmarks share (tests/clusters.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
LABELS = demo_workflow().parent / "nc_landclass96.tif"
UPSAMPLE = 4


def under_worker_malloc() -> None:
    """Re-run this script under the allocator settings geoseg gives its Dask workers (glibc reads
    them at start-up), so that what runs in this process, such as the model-alone limit, uses
    the same malloc as the workers it is compared with."""
    if any(os.environ.get(k) != v for k, v in WORKER_MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WORKER_MALLOC_ENV})


def append_result(name: str, record: dict[str, Any]) -> Path:
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(
        {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": platform.processor() or platform.machine(),
            **record,
        }
    )
    out.write_text(json.dumps(history, indent=1) + "\n")
    return out


class PeakMemory:
    """Peak of the summed RSS of this process and its descendants while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop:
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def make_class_map(path: Path, size: int, shift: int = 0) -> None:
    """The NC 1996 land-cover map upsampled 4x (nearest, as if mapped at 7 m), tiled to
    ``size`` x ``size`` px, starting ``shift`` px into the tiling (a second map to compare)."""
    with rasterio.open(LABELS) as src:
        tile, profile = src.read(1), src.profile
    tile = np.repeat(np.repeat(tile, UPSAMPLE, 0), UPSAMPLE, 1)
    tile[tile == 0] = 255  # the map's one unlabelled pixel, as nodata
    t = profile["transform"]
    profile.update(
        width=size,
        height=size,
        nodata=255,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        transform=rasterio.Affine(t.a / UPSAMPLE, 0, t.c, 0, t.e / UPSAMPLE, t.f),
    )
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, 2048):  # in strips: the map is never whole in memory here
            h = min(2048, size - r)
            rows = np.arange(r + shift, r + h + shift) % tile.shape[0]
            cols = np.arange(shift, size + shift) % tile.shape[1]
            dst.write(tile[np.ix_(rows, cols)], 1, window=Window(0, r, size, h))
        write_class_metadata(dst, [ClassInfo(i, f"class {i}", "#808080") for i in range(1, 8)])


def size_arguments(doc: str | None) -> argparse.Namespace:
    """--sizes and --block, the options of the class-map benchmarks; logging at warnings."""
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--block", type=int, default=2048)
    return ap.parse_args()


def finish(name: str, rows: list[dict[str, Any]], **record: Any) -> Path:
    """Print ``rows`` as a table, a line per figure and a column per row, and append them (with
    ``record``) to results/NAME.json."""
    width = max(len(k) for r in rows for k in r)
    for k in dict.fromkeys(k for r in rows for k in r):
        print(f"{k:>{width}}: " + "  ".join(str(r.get(k, "")) for r in rows))
    return append_result(name, {**record, "rows": rows})
