from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from genq_core.generate.prompts import build_specs
from genq_core.generate.tiny import build_tiny_pipeline
from genq_core.inversion import (
    TextualInversionCanceled,
    TextualInversionConfig,
    apply_tokens,
    class_tokens,
    learn_tokens,
    load_kshot_folder,
    load_tokens,
    save_tokens,
)
from genq_core.inversion.textual_inversion import _substitute_rows
from tests.genq_core.inversion.conftest import make_image

# mypy sees diffusers' top-level classes as unrelated dummies; the tests type pipelines loosely.
Pipe = Any

FAST = TextualInversionConfig(steps=3, batch_size=2, lr=0.05)


def _embedding_weight(pipe: Pipe) -> torch.Tensor:
    return pipe.text_encoder.get_input_embeddings().weight.detach().clone()


def _word_embedding(pipe: Pipe, word: str) -> torch.Tensor:
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    return _embedding_weight(pipe)[ids].mean(0)


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps"),
        ("lr", 0.0, "lr"),
        ("style_token", "<GenQ>", "style_token"),
        ("style_token", "two words", "style_token"),
        ("class_token", "<genq-class>", "class_token"),
        ("class_token", "<genq-{name}>", "class_token"),
        ("init_word", " ", "init_word"),
        ("resolution", 4, "resolution"),
        ("captions", ("a photo of a {cls}",), "captions"),
        ("captions", ("a {cls} by {token} in {place}",), "captions"),
        ("flip_p", 1.5, "flip_p"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextualInversionConfig(**{field: value})  # type: ignore[arg-type]


def test_class_tokens_follow_the_format() -> None:
    config = TextualInversionConfig(per_class_tokens=True, class_token="<c{index}>")
    assert class_tokens(["cat", "dog"], config) == {"cat": "<c0>", "dog": "<c1>"}
    assert class_tokens(["cat", "dog"], TextualInversionConfig()) == {}


# ---- k-shot folders ---------------------------------------------------------------------------


def _kshot_folder(root: Path) -> Path:
    for name, seeds in (("dog", (0, 1)), ("cat", (2,))):
        (root / name).mkdir(parents=True)
        for seed in seeds:
            make_image(seed).save(root / name / f"{seed}.png")
    return root


def test_load_kshot_folder_reads_classes_in_sorted_order(tmp_path: Path) -> None:
    root = _kshot_folder(tmp_path / "kshot")
    (root / "dog" / ".DS_Store").write_bytes(b"\0junk")
    Image.new("L", (9, 12), 128).save(root / "cat" / "gray.jpg")

    images, labels, names = load_kshot_folder(root)

    assert names == ["cat", "dog"]
    assert labels == [0, 0, 1, 1]
    assert [image.mode for image in images] == ["RGB"] * 4
    assert images[1].size == (9, 12)


@pytest.mark.parametrize(
    ("make_bad", "bad_name"),
    [
        (lambda root: (root / "dog" / "notes.txt").write_text("hi"), "notes.txt"),
        (lambda root: (root / "dog" / "broken.png").write_bytes(b"not a png"), "broken.png"),
        (lambda root: make_image(9, size=(7, 30)).save(root / "cat" / "thin.png"), "thin.png"),
        (lambda root: make_image(9).save(root / "loose.png"), "loose.png"),
        (lambda root: (root / "empty").mkdir(), "empty"),
    ],
)
def test_load_kshot_folder_names_the_bad_file(tmp_path: Path, make_bad, bad_name: str) -> None:
    root = _kshot_folder(tmp_path / "kshot")
    make_bad(root)
    with pytest.raises(ValueError, match=bad_name):
        load_kshot_folder(root)


def test_load_kshot_folder_rejects_missing_or_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        load_kshot_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_kshot_folder(tmp_path)


# ---- learning ---------------------------------------------------------------------------------


def test_only_the_new_token_embedding_moves(tiny_pipe: Pipe, kshot) -> None:
    images, labels, names = kshot
    before = _embedding_weight(tiny_pipe)
    vocab_size = len(tiny_pipe.tokenizer)
    unet_before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    init = _word_embedding(tiny_pipe, FAST.init_word)

    tokens = learn_tokens(tiny_pipe, images, labels, names, FAST)

    # learning leaves the pipeline as it was: same vocabulary, weights, flags, no gradients
    assert list(tokens) == ["<genq-style>"]
    assert len(tiny_pipe.tokenizer) == vocab_size
    assert torch.equal(_embedding_weight(tiny_pipe), before)
    for name, value in tiny_pipe.unet.state_dict().items():
        assert torch.equal(value, unet_before[name]), name
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    embedding = tiny_pipe.text_encoder.get_input_embeddings()
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks
    # the new token did learn something
    learned = tokens["<genq-style>"]
    assert learned.shape == (32,) and learned.dtype == torch.float32
    assert (learned - init).abs().max() > 1e-3

    # once applied: old rows bit-identical, the new row exactly the learned vector
    assert apply_tokens(tiny_pipe, tokens) == ["<genq-style>"]
    after = _embedding_weight(tiny_pipe)
    token_id = tiny_pipe.tokenizer.convert_tokens_to_ids("<genq-style>")
    assert after.shape[0] == before.shape[0] + 1
    assert torch.equal(after[: before.shape[0]], before)
    assert torch.equal(after[token_id], learned)


def test_learning_is_deterministic_for_a_seed(kshot) -> None:
    images, labels, names = kshot
    config = TextualInversionConfig(steps=2, batch_size=2, lr=0.05, seed=3)
    pipes: list[Pipe] = [build_tiny_pipeline(), build_tiny_pipeline()]
    first = learn_tokens(pipes[0], images, labels, names, config)
    second = learn_tokens(pipes[1], images, labels, names, config)
    assert torch.equal(first["<genq-style>"], second["<genq-style>"])


def test_per_class_tokens_are_learned_and_drive_generation(tiny_pipe: Pipe, kshot) -> None:
    images, labels, names = kshot
    config = TextualInversionConfig(steps=4, batch_size=2, lr=0.05, per_class_tokens=True)

    tokens = learn_tokens(tiny_pipe, images, labels, names, config)

    mapping = class_tokens(names, config)
    assert list(tokens) == ["<genq-style>", *mapping.values()]
    init = _word_embedding(tiny_pipe, config.init_word)
    for token, vector in tokens.items():
        assert (vector - init).abs().max() > 1e-4, token
    apply_tokens(tiny_pipe, tokens)
    specs = build_specs(names, 1, ["a photo of a {cls}"], [], seed=0, class_tokens=mapping)
    assert specs[0].prompt == "a photo of a cat in the style of <genq-class-0>"
    result = tiny_pipe(
        [spec.prompt for spec in specs],
        num_inference_steps=1,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert result.images.shape == (2, 16, 16, 3)


def test_v_prediction_pipelines_train(tiny_pipe: Pipe, kshot) -> None:
    images, labels, names = kshot
    tiny_pipe.scheduler.register_to_config(prediction_type="v_prediction")
    tokens = learn_tokens(tiny_pipe, images, labels, names, FAST)
    assert torch.isfinite(tokens["<genq-style>"]).all()


def test_progress_and_cancel(tiny_pipe: Pipe, kshot) -> None:
    images, labels, names = kshot
    seen: list[tuple[str, int, int]] = []
    learn_tokens(tiny_pipe, images, labels, names, FAST, on_progress=lambda *a: seen.append(a))
    assert seen == [("invert", 1, 3), ("invert", 2, 3), ("invert", 3, 3)]

    polls = iter([False, True])
    before = _embedding_weight(tiny_pipe)
    with pytest.raises(TextualInversionCanceled, match="step 1/3"):
        learn_tokens(tiny_pipe, images, labels, names, FAST, should_stop=lambda: next(polls))
    embedding = tiny_pipe.text_encoder.get_input_embeddings()
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks
    assert torch.equal(_embedding_weight(tiny_pipe), before)
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_learn_tokens_rejects_bad_inputs(tiny_pipe: Pipe, kshot) -> None:
    images, labels, names = kshot
    with pytest.raises(ValueError, match="labels"):
        learn_tokens(tiny_pipe, images, labels[:-1], names, FAST)
    with pytest.raises(ValueError, match=r"labels \[2\]"):
        learn_tokens(tiny_pipe, images, [0, 1, 2, 0, 1, 0], names, FAST)
    with pytest.raises(ValueError, match="images is empty"):
        learn_tokens(tiny_pipe, [], [], names, FAST)
    odd = TextualInversionConfig(steps=1, resolution=17)
    with pytest.raises(ValueError, match="scale factor"):
        learn_tokens(tiny_pipe, images, labels, names, odd)
    long_names = ["cat " * 80, "dog"]
    with pytest.raises(ValueError, match="captions are longer"):
        learn_tokens(tiny_pipe, images, labels, long_names, FAST)
    apply_tokens(tiny_pipe, {"<genq-style>": torch.zeros(32)})
    with pytest.raises(ValueError, match="already in the pipeline's tokenizer"):
        learn_tokens(tiny_pipe, images, labels, names, FAST)


# ---- saving and loading -----------------------------------------------------------------------


def test_saved_token_reloads_exactly_through_diffusers(
    tiny_pipe: Pipe, kshot, tmp_path: Path
) -> None:
    images, labels, names = kshot
    tokens = learn_tokens(tiny_pipe, images, labels, names, FAST)
    path = tmp_path / "out" / "style.safetensors"

    data = save_tokens(tokens, path)

    assert path.read_bytes() == data
    assert list(load_file(path)) == ["<genq-style>"]
    fresh: Pipe = build_tiny_pipeline()
    fresh.load_textual_inversion(str(path), token="<genq-style>")
    token_id = fresh.tokenizer.convert_tokens_to_ids("<genq-style>")
    assert torch.equal(_embedding_weight(fresh)[token_id], tokens["<genq-style>"])
    assert fresh.tokenizer.tokenize("a <genq-style> cat")[1] == "<genq-style>"


def test_multi_token_files_round_trip_through_bytes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = {"<s>": torch.randn(32, generator=gen), "<c0>": torch.randn(32, generator=gen)}
    data = save_tokens(tokens)
    loaded = load_tokens(data)
    assert list(loaded) == ["<s>", "<c0>"]
    assert all(torch.equal(loaded[k], tokens[k]) for k in tokens)

    pipe: Pipe = build_tiny_pipeline()
    assert apply_tokens(pipe, data) == ["<s>", "<c0>"]
    weight = _embedding_weight(pipe)
    for name, vector in tokens.items():
        assert torch.equal(weight[pipe.tokenizer.convert_tokens_to_ids(name)], vector)


def test_token_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        save_tokens({})
    with pytest.raises(ValueError, match="<b>"):
        save_tokens({"<a>": torch.zeros(4), "<b>": torch.zeros(5)})
    with pytest.raises(ValueError, match="float"):
        save_tokens({"<a>": torch.zeros(4, dtype=torch.long)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_tokens(bad)
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.safetensors")
    pipe: Pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="needs 32"):
        apply_tokens(pipe, {"<a>": torch.zeros(16)})


def test_training_view_of_new_tokens_equals_the_applied_tokens(tiny_pipe: Pipe) -> None:
    """What learning optimises (hooked rows) is what generation sees after apply_tokens."""
    private = copy.deepcopy(tiny_pipe.tokenizer)
    private.add_tokens(["<a>", "<b>"])
    text = ["a <b> photo of <a> cat"]
    ids = private(text, padding="max_length", return_tensors="pt").input_ids
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    new_ids = torch.tensor(private.convert_tokens_to_ids(["<a>", "<b>"]))
    embedding = tiny_pipe.text_encoder.get_input_embeddings()
    with torch.no_grad(), _substitute_rows(embedding, new_ids, rows):
        hooked = tiny_pipe.text_encoder(ids)[0]

    apply_tokens(tiny_pipe, {"<a>": rows[0], "<b>": rows[1]})
    applied_ids = tiny_pipe.tokenizer(text, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        applied = tiny_pipe.text_encoder(applied_ids)[0]

    assert torch.equal(ids, applied_ids)
    assert torch.equal(hooked, applied)
