"""One task instance: an image, a question about it and the expected answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Example:
    id: str
    image: Image.Image
    question: str
    answer: str
    # Where the evidence is, in pixels of ``image`` (x1, y1, x2, y2); None if unknown.
    target_box: tuple[int, int, int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
