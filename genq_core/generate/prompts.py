"""Prompts and seeds: what to generate for each class, decided before any image is made.

:func:`build_specs` turns class names into one :class:`ImageSpec` per image. Templates are
CLIP-style (``"a photo of a {adjective} {cls}"``); each image draws its template and adjective from
a random stream seeded by ``(seed, class_index, j)``, and its generation seed is derived from the
same triple, so an image's prompt and seed depend on nothing else: adding classes or images
elsewhere changes no existing image.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ADJECTIVES",
    "DEFAULT_TEMPLATES",
    "PLACEHOLDERS",
    "ImageSpec",
    "build_specs",
    "check_templates",
]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {adjective} {cls}",
    "a {adjective} photo of a {cls}",
    "a photo of the {adjective} {cls}",
    "a close-up photo of a {cls}",
    "a cropped photo of the {cls}",
    "a good photo of a {cls}",
)

DEFAULT_ADJECTIVES: tuple[str, ...] = (
    "clean",
    "small",
    "large",
    "bright",
    "dark",
    "nice",
    "real",
    "typical",
)

# The fields a template may use: the class name, an adjective and a learned token.
PLACEHOLDERS = ("cls", "adjective", "token")

# Appended to templates without ``{token}`` when a style token is given.
_STYLE_SUFFIX = " in the style of {token}"


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to generate one image.

    Attributes:
        index: position in the generated set (0-based).
        class_index: the classifier's label for the class.
        class_name: the class name used in the prompt.
        prompt: the text prompt.
        seed: seed of the image's own ``torch.Generator`` (``0 <= seed < 2**63``).
    """

    index: int
    class_index: int
    class_name: str
    prompt: str
    seed: int


def build_specs(
    class_names: Sequence[str],
    num_per_class: int,
    templates: Sequence[str],
    adjectives: Sequence[str],
    seed: int,
    style_token: str | None = None,
    class_tokens: Mapping[str, str] | None = None,
) -> list[ImageSpec]:
    """``num_per_class`` image specs per class, class by class; deterministic.

    Image ``j`` of class ``c`` (label ``c`` = position in ``class_names``) gets index
    ``c * num_per_class + j``, a template and adjective drawn uniformly at random, and a seed, all
    from a stream keyed by ``(seed, c, j)``.

    Args:
        class_names: one name per classifier label, in label order.
        num_per_class: images per class.
        templates: prompt templates with ``{cls}`` and optionally ``{adjective}`` and ``{token}``.
        adjectives: words for ``{adjective}``; may be empty if no template uses it.
        seed: base seed of the whole set.
        style_token: a learned token (textual inversion). Templates with ``{token}`` put it
            there; the others get ``" in the style of {token}"`` appended.
        class_tokens: class name -> its own learned token, used instead of ``style_token`` for
            that class. Every class needs a token then, from here or from ``style_token``.

    Raises:
        ValueError: empty or duplicate class names, ``num_per_class < 1``, templates without
            ``{cls}`` or with unknown placeholders, ``{adjective}`` without adjectives,
            ``{token}`` without a token, or ``class_tokens`` naming unknown classes.
    """
    # 1. check inputs
    names = list(class_names)
    if not names:
        raise ValueError("class_names: at least one class is needed")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names: every name must be a non-empty string, got {name!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"class_names: duplicate names {duplicates}")
    if not isinstance(num_per_class, int) or isinstance(num_per_class, bool) or num_per_class < 1:
        raise ValueError(f"num_per_class must be an integer >= 1, got {num_per_class!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    templates = tuple(templates)
    adjectives = tuple(adjectives)
    check_templates(templates, adjectives)
    tokens = _class_tokens(names, style_token, class_tokens)
    if tokens is None and any("token" in _fields(t) for t in templates):
        raise ValueError("templates: {token} is used but no style_token or class_tokens given")

    # 2. one spec per image, each from its own random stream
    specs = []
    for class_index, name in enumerate(names):
        token = tokens[name] if tokens is not None else None
        for j in range(num_per_class):
            rng = random.Random(_derive_seed(seed, class_index, j, "prompt"))
            template = rng.choice(templates)
            adjective = rng.choice(adjectives) if adjectives else ""
            if token is not None and "token" not in _fields(template):
                template += _STYLE_SUFFIX
            prompt = template.format(cls=name, adjective=adjective, token=token)
            specs.append(
                ImageSpec(
                    index=class_index * num_per_class + j,
                    class_index=class_index,
                    class_name=name,
                    prompt=" ".join(prompt.split()),
                    seed=_derive_seed(seed, class_index, j, "image"),
                )
            )
    return specs


def check_templates(templates: Sequence[str], adjectives: Sequence[str]) -> None:
    """Raise ``ValueError`` unless every template is usable with these adjectives."""
    if not templates:
        raise ValueError("templates: at least one template is needed")
    for template in templates:
        if not isinstance(template, str):
            raise ValueError(f"templates: every template must be a string, got {template!r}")
        try:
            fields = _fields(template)
        except ValueError as err:
            raise ValueError(f"templates: {template!r} is not a valid template: {err}") from err
        unknown = sorted(fields - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(
                f"templates: {template!r} uses unknown placeholders {unknown}; "
                f"allowed: {list(PLACEHOLDERS)}"
            )
        if "cls" not in fields:
            raise ValueError(f"templates: {template!r} must contain {{cls}}")
        if "adjective" in fields and not adjectives:
            raise ValueError(f"templates: {template!r} uses {{adjective}} but adjectives is empty")
    for adjective in adjectives:
        if not isinstance(adjective, str) or not adjective.strip():
            raise ValueError(
                f"adjectives: every adjective must be a non-empty string, got {adjective!r}"
            )


def _class_tokens(
    names: list[str], style_token: str | None, class_tokens: Mapping[str, str] | None
) -> dict[str, str] | None:
    if style_token is not None and (not isinstance(style_token, str) or not style_token.strip()):
        raise ValueError(f"style_token must be a non-empty string, got {style_token!r}")
    if class_tokens is None:
        return None if style_token is None else dict.fromkeys(names, style_token)
    unknown = sorted(set(class_tokens) - set(names))
    if unknown:
        raise ValueError(f"class_tokens: unknown classes {unknown}")
    missing = [name for name in names if name not in class_tokens]
    if missing and style_token is None:
        raise ValueError(
            f"class_tokens: no token for classes {missing} and no style_token to fall back on"
        )
    for name, token in class_tokens.items():
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"class_tokens: token of {name!r} must be a non-empty string")
    return {name: class_tokens.get(name, style_token or "") for name in names}


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _derive_seed(seed: int, class_index: int, j: int, purpose: str) -> int:
    """A 63-bit seed that depends only on its arguments (stable across runs and platforms)."""
    digest = hashlib.sha256(f"genq:{purpose}:{seed}:{class_index}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
