"""Class lists, with no dependency: :class:`ClassInfo` and :data:`NODATA`.

Every module that needs a class or the "no class" value imports it from here, from the losses
(pure torch) to the class-map writer.
"""

from __future__ import annotations

from dataclasses import dataclass

NODATA = 255
"""The one value that means "no class": nodata in every class map and probabilities raster
geoseg writes, and the target value that training ignores (unlabelled, masked or outside the
scene). Class ids are therefore 0-254."""

CODE_RANGE = "class ids are whole numbers 0-254 (255 marks nodata in class maps)"


@dataclass(frozen=True)
class ClassInfo:
    """One class: the user's code, a name and a colour (``#rrggbb``)."""

    id: int
    name: str
    color: str

    def rgba(self) -> tuple[int, int, int, int]:
        h = self.color.lstrip("#")
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255)
