"""One task instance: its image(s), a question about them and the expected answer.

Every data format (synthetic, rows, verl, hf, tsv, vstar) loads to this one type. A
multi-image row keeps its first image in ``image`` (the one the tools act on) and the
rest in ``extra_images``; the question then holds one ``<image>`` placeholder per image
where the chat puts it (none: all images go before the text)."""
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
    extra_images: list[Image.Image] = field(default_factory=list)
    # The data's own system prompt (data.system_prompt=keep uses it); None: the config's.
    system_prompt: str | None = None
    # How the answer is checked when reward.match_mode=auto: exact | choice | number
    # (multiple-choice rows are "choice", answered by letter).
    answer_type: str = "exact"

    @property
    def images(self) -> list[Image.Image]:
        return [self.image, *self.extra_images]


IMAGE_PLACEHOLDER = "<image>"

_ARRAY_MODES = ("RGB", "RGBA", "L")


def examples_to_wire(examples: list[Example]) -> list[tuple[Example, object]]:
    """(example without its image, the image's pixels as a numpy array): Ray stores
    arrays out of band and a reader maps them without a copy, where a pickled PIL image
    costs a serialisation and a copy each way (4 s + 2 s for the 768 MB of a 256-example
    testbed eval set). Images of other modes travel as they are."""
    import dataclasses

    import numpy as np

    return [(dataclasses.replace(ex, image=None, extra_images=[]),
             [np.asarray(im) for im in ex.images])
            if all(im.mode in _ARRAY_MODES for im in ex.images) else (ex, None)
            for ex in examples]


def examples_from_wire(items) -> list[Example]:
    """Inverse of :func:`examples_to_wire`."""
    import dataclasses

    return [ex if pixels is None else dataclasses.replace(
        ex, image=Image.fromarray(pixels[0]), extra_images=[Image.fromarray(p) for p in pixels[1:]])
            for ex, pixels in items]
