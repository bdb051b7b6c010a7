from __future__ import annotations

import pytest

from genq_core.generate.prompts import (
    DEFAULT_ADJECTIVES,
    DEFAULT_TEMPLATES,
    ImageSpec,
    build_specs,
)

CLASSES = ["T-shirt/top", "trouser", "ankle boot"]


def _specs(**changes: object) -> list[ImageSpec]:
    kwargs: dict = {
        "class_names": CLASSES,
        "num_per_class": 4,
        "templates": DEFAULT_TEMPLATES,
        "adjectives": DEFAULT_ADJECTIVES,
        "seed": 0,
    }
    kwargs.update(changes)
    return build_specs(**kwargs)


def test_layout_and_determinism() -> None:
    specs = _specs()
    assert specs == _specs()
    assert [s.index for s in specs] == list(range(12))
    assert [s.class_index for s in specs] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(s.class_name == CLASSES[s.class_index] for s in specs)
    assert all(s.class_name in s.prompt and "  " not in s.prompt for s in specs)
    assert "{" not in "".join(s.prompt for s in specs)
    seeds = [s.seed for s in specs]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_base_seed_changes_every_image_seed() -> None:
    assert not {s.seed for s in _specs(seed=0)} & {s.seed for s in _specs(seed=1)}


def test_adding_classes_or_images_changes_no_existing_prompt_or_seed() -> None:
    def key(spec: ImageSpec) -> tuple:
        return spec.class_index, spec.prompt, spec.seed

    base = [key(s) for s in _specs()]
    more_classes = [key(s) for s in _specs(class_names=[*CLASSES, "bag", "sandal"])]
    more_images = [key(s) for s in _specs(num_per_class=7)]
    assert more_classes[: len(base)] == base
    assert [k for k in more_images if k in base] == base
    assert len(more_images) == 21


def test_templates_and_adjectives_are_all_drawn() -> None:
    specs = _specs(num_per_class=100, class_names=["dog"])
    prompts = {s.prompt for s in specs}
    for template in DEFAULT_TEMPLATES:
        start = template.split("{")[0]
        assert any(p.startswith(start) for p in prompts), template
    for adjective in DEFAULT_ADJECTIVES:
        assert any(f" {adjective} " in p for p in prompts), adjective


def test_style_token_is_appended_or_placed() -> None:
    specs = _specs(templates=("a photo of a {cls}",), style_token="<genq-style>")
    assert {s.prompt for s in specs if s.class_index == 1} == {
        "a photo of a trouser in the style of <genq-style>"
    }
    placed = _specs(templates=("a {token} picture of a {cls}",), style_token="<s>")
    assert placed[0].prompt == "a <s> picture of a T-shirt/top"
    # the token does not change seeds
    assert [s.seed for s in specs] == [s.seed for s in _specs()]


def test_class_tokens_override_the_style_token() -> None:
    specs = _specs(
        templates=("a photo of a {cls}",),
        style_token="<style>",
        class_tokens={"trouser": "<trouser>"},
    )
    assert specs[0].prompt == "a photo of a T-shirt/top in the style of <style>"
    assert specs[4].prompt == "a photo of a trouser in the style of <trouser>"
    every = {name: f"<c{i}>" for i, name in enumerate(CLASSES)}
    assert _specs(templates=("{cls}",), class_tokens=every)[8].prompt == (
        "ankle boot in the style of <c2>"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_names": []}, "class_names: at least one"),
        ({"class_names": ["a", " "]}, "class_names: every name"),
        ({"class_names": ["a", "b", "a"]}, r"class_names: duplicate names \['a'\]"),
        ({"num_per_class": 0}, "num_per_class"),
        ({"seed": 1.5}, "seed"),
        ({"templates": ()}, "templates: at least one"),
        ({"templates": ("a photo",)}, "must contain {cls}"),
        ({"templates": ("a {cls} {colour}",)}, r"unknown placeholders \['colour'\]"),
        ({"templates": ("a {} {cls}",)}, "unknown placeholders"),
        ({"templates": ("a {cls",)}, "not a valid template"),
        ({"adjectives": ()}, "uses {adjective} but adjectives is empty"),
        ({"adjectives": ("", "big")}, "adjectives: every adjective"),
        ({"templates": ("{token} {cls}",)}, "no style_token or class_tokens"),
        ({"style_token": ""}, "style_token"),
        ({"class_tokens": {"cat": "<c>"}, "style_token": "<s>"}, r"unknown classes \['cat'\]"),
        ({"class_tokens": {"trouser": "<t>"}}, "no token for classes"),
    ],
)
def test_bad_inputs_are_named(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _specs(**changes)


def test_templates_without_adjectives_need_none() -> None:
    specs = _specs(templates=("a photo of a {cls}",), adjectives=())
    assert specs[0].prompt == "a photo of a T-shirt/top"
