"""A Dask worker preload for geoseg's local cluster: what its worker processes print.

The local cluster's workers share the terminal with the client. Ctrl-C reaches every process of
the foreground group, so each worker would print a traceback of its own: they ignore it, and
the client stops them as it closes the cluster and says itself what was kept. A scene without a
CRS is refused or predicted on purpose (``--allow-no-crs``), so rasterio's warning about it is
not repeated by every worker.
"""

from __future__ import annotations

import signal
import threading
import warnings
from typing import Any


def dask_setup(worker: Any) -> None:
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
