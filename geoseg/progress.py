"""Progress on long work, written to stderr (a bar on a terminal, a line every few seconds
otherwise), silenced when the ``geoseg`` logger is quieter than INFO."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

log = logging.getLogger("geoseg")


class Progress:
    """Count ``total`` steps of work called ``label``; ``update()`` after each one."""

    def __init__(self, label: str, total: int, unit: str = "blocks") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.pixels = 0
        self.note = ""
        self.start = self._last = time.monotonic()
        self.enabled = log.isEnabledFor(logging.INFO)
        self._drawn = -1
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None and (self.tty or self._drawn != self.done):
            self._draw(final=True)
        elif self.enabled and self.tty:
            sys.stderr.write("\n")

    def update(self, n: int = 1, note: str = "", pixels: int = 0) -> None:
        self.done += n
        self.pixels += pixels
        if note:
            self.note = note
        now = time.monotonic()
        if self.tty or now - self._last >= 5.0:
            self._draw()
            self._last = now
            self._drawn = self.done

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(24 * frac)
        rate = f"{self.pixels / elapsed / 1e6:.2f} Mpx/s " if self.pixels and elapsed > 0 else ""
        left = ""
        if 0 < self.done < self.total:
            left = f"{elapsed / self.done * (self.total - self.done):.0f}s left "
        line = (
            f"{self.label}: [{bar:<24}] {self.done}/{self.total} {self.unit} "
            f"{elapsed:5.1f}s {rate}{left}{self.note}".rstrip()
        )
        sys.stderr.write("\r" + line + ("\n" if final else "") if self.tty else line + "\n")
        sys.stderr.flush()
