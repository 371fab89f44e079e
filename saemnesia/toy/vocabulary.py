"""The ToyCanvas concepts and prompts: 8 shapes (objects) × 8 painting styles, plus the plain rendering.

Names follow UnlearnCanvas: one word per object, styles with underscores that prompts show as spaces
("An image of Star in Pop Art style.").
"""

from __future__ import annotations

from saemnesia.concepts import ConceptVocabulary, styled_prompt

TOY_OBJECTS = ("Circle", "Square", "Triangle", "Star", "Cross", "Heart", "Moon", "Ring")
"""The shapes, in classifier head order."""

TOY_STYLES = ("Pop_Art", "Blueprint", "Sunset", "Greenfield", "Mosaic", "Ink_Art", "Neon", "Pastel")
"""The styles, in classifier head order; each is a colour palette plus a texture or stroke treatment."""

NO_OBJECT_LABEL = "No_Object"
"""Object classifier label of an image that shows none of the shapes: what erasing an object may leave."""

PLAIN_LABEL = "Plain"
"""Style classifier label of the plain rendering (a prompt without style), like UnlearnCanvas' `Seed_Images`."""

TOY_VOCABULARY = ConceptVocabulary(objects=TOY_OBJECTS, styles=TOY_STYLES)


def toy_prompt(obj: str, style: str | None) -> str:
    """`"An image of {object} in {style with spaces} style."`, or `"An image of {object}."` for `style=None`."""
    return styled_prompt(f"An image of {obj}", style)
