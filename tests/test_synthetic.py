"""steps.synthetic: determinism, image format, attribute vocabularies and their overlap across classes."""

import hashlib
import io
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from steps import defaults
from steps.synthetic import (
    BACKGROUNDS,
    EAR_SHAPES,
    EYE_COLORS,
    FUR_COLORS,
    IMAGE_SIZE,
    LABELS,
    MUZZLES,
    PATTERNS,
    PHOTO_QUALITY,
    SUBTYPES,
    draw_face,
    draw_photo,
)

VOCABULARY = {
    "fur_color": set(FUR_COLORS),
    "pattern": set(PATTERNS),
    "ear_shape": set(EAR_SHAPES),
    "eye_color": set(EYE_COLORS),
    "background": set(BACKGROUNDS),
    "muzzle": set(MUZZLES),
    "subtype": set(SUBTYPES),
}
DRAWS = 150  # per class; about 1.5 s in all


@pytest.fixture(scope="module")
def attributes() -> dict[str, list[dict[str, str]]]:
    return {label: [draw_face(label, [7, 0, li, i], size=32)[1] for i in range(DRAWS)] for li, label in enumerate(LABELS)}


def test_public_constants():
    assert LABELS == ("cat", "dog", "wild")
    assert IMAGE_SIZE == 128


def test_same_seed_same_bytes_and_different_seeds_differ():
    for li, label in enumerate(LABELS):
        a, attrs_a = draw_face(label, [1, 0, li, 3])
        b, attrs_b = draw_face(label, (1, 0, li, 3))  # list or tuple: same seed
        c, _ = draw_face(label, [1, 0, li, 4])
        assert a.tobytes() == b.tobytes() and attrs_a == attrs_b
        assert a.tobytes() != c.tobytes()
    assert draw_face("cat", 5)[0].tobytes() == draw_face("cat", 5)[0].tobytes()


@pytest.mark.parametrize("size", [IMAGE_SIZE, 64, 33])
def test_every_label_gives_rgb_of_requested_size(size):
    for li, label in enumerate(LABELS):
        image, _ = draw_face(label, [0, 0, li, 0], size=size)
        assert image.mode == "RGB" and image.size == (size, size)
        assert np.asarray(image).std() > 10  # a picture, not a blank


def test_default_size():
    assert draw_face("dog", 1)[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="unknown label"):
        draw_face("horse", 0)


def test_attributes_are_strings_from_the_vocabularies(attributes):
    for rows in attributes.values():
        for attrs in rows:
            assert set(VOCABULARY) <= set(attrs)
            for key, allowed in VOCABULARY.items():
                assert isinstance(attrs[key], str) and attrs[key] in allowed, (key, attrs[key])


def test_shared_attributes_overlap_across_classes(attributes):
    # Colour and markings must not give the class away: each value occurs in at least two classes.
    for key in ("fur_color", "pattern", "eye_color", "background"):
        classes = defaultdict(set)
        for label, rows in attributes.items():
            for attrs in rows:
                classes[attrs[key]].add(label)
        assert set(classes) == VOCABULARY[key], key  # every value is used
        assert all(len(labels) >= 2 for labels in classes.values()), (key, dict(classes))


def test_no_class_is_dominated_by_one_fur_colour(attributes):
    for label, rows in attributes.items():
        counts = np.unique([a["fur_color"] for a in rows], return_counts=True)[1]
        assert counts.max() / len(rows) < 0.4, label


def test_single_shape_features_overlap_but_the_combination_decides(attributes):
    by_shape = defaultdict(set)
    for label, rows in attributes.items():
        for attrs in rows:
            by_shape["ear:" + attrs["ear_shape"]].add(label)
            by_shape["muzzle:" + attrs["muzzle"]].add(label)
    assert by_shape["ear:pointed"] == {"cat", "wild"}  # cats and foxes/wolves
    assert by_shape["ear:rounded"] == {"dog", "wild"}  # half-up dogs and big cats
    assert by_shape["muzzle:long"] == {"dog", "wild"}  # dogs and wolves/foxes
    combos = {label: {(a["ear_shape"], a["muzzle"]) for a in rows} for label, rows in attributes.items()}
    assert not (combos["cat"] & combos["dog"]) and not (combos["cat"] & combos["wild"])
    assert not (combos["dog"] & combos["wild"])


# --- the default images are pinned; AFHQ-sized ones (draw_photo) -----------------------------------

# sha256 of the pixels of nine default faces, taken before `draw_photo` existed: the 128 px images of
# the default pipeline must never change by accident (every trained model and figure rests on them).
DEFAULT_PIXELS_SHA256 = "6a4be812fbe6e19a1446606a6ca1f58cd78296e5a5cb64afef4fe218bf43dadb"


def test_default_faces_are_unchanged():
    digest = hashlib.sha256()
    for li, label in enumerate(LABELS):
        for i in range(3):
            digest.update(draw_face(label, [42, 0, li, i])[0].tobytes())
    assert digest.hexdigest() == DEFAULT_PIXELS_SHA256
    assert defaults.SYNTHETIC_SIZE == IMAGE_SIZE  # the pipeline writes the generator's own size


def jpeg_bytes(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_photo_size_faces_weigh_like_afhq_photos():
    sizes = []
    for li, label in enumerate(LABELS):
        for i in range(2):
            image, attrs = draw_photo(label, [42, 0, li, i], 512)
            assert image.mode == "RGB" and image.size == (512, 512)
            # The very drawing of draw_face, with its attributes: same class, same look once reduced.
            small, small_attrs = draw_face(label, [42, 0, li, i])
            assert attrs == small_attrs
            reduced = np.asarray(image.resize(small.size, Image.Resampling.BOX), dtype=float)
            assert np.abs(reduced - np.asarray(small, dtype=float)).mean() < 4
            sizes.append(len(jpeg_bytes(image, PHOTO_QUALITY)))
    # AFHQ's photos: 27 to 75 KB (median 43 KB) at this size and quality.
    assert all(20_000 < size < 90_000 for size in sizes), sizes


def test_photo_size_faces_are_deterministic_and_only_for_large_sizes():
    a, b = draw_photo("wild", [1, 2, 3], 256)[0], draw_photo("wild", (1, 2, 3), 256)[0]
    assert a.size == (256, 256) and a.tobytes() == b.tobytes()
    assert a.tobytes() != draw_photo("wild", [1, 2, 4], 256)[0].tobytes()
    with pytest.raises(ValueError, match="draw_face"):
        draw_photo("cat", 0, IMAGE_SIZE)
