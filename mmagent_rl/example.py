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


_ARRAY_MODES = ("RGB", "RGBA", "L")


def examples_to_wire(examples: list[Example]) -> list[tuple[Example, object]]:
    """(example without its image, the image's pixels as a numpy array): Ray stores
    arrays out of band and a reader maps them without a copy, where a pickled PIL image
    costs a serialisation and a copy each way (4 s + 2 s for the 768 MB of a 256-example
    testbed eval set). Images of other modes travel as they are."""
    import dataclasses

    import numpy as np

    return [(dataclasses.replace(ex, image=None), np.asarray(ex.image))
            if ex.image.mode in _ARRAY_MODES else (ex, None) for ex in examples]


def examples_from_wire(items) -> list[Example]:
    """Inverse of :func:`examples_to_wire`."""
    import dataclasses

    return [ex if pixels is None else dataclasses.replace(ex, image=Image.fromarray(pixels))
            for ex, pixels in items]
