"""steps.synthetic: determinism, image format, attribute vocabularies and their overlap across classes."""

from collections import defaultdict

import numpy as np
import pytest

from steps.synthetic import (
    BACKGROUNDS,
    EAR_SHAPES,
    EYE_COLORS,
    FUR_COLORS,
    IMAGE_SIZE,
    LABELS,
    MUZZLES,
    PATTERNS,
    SUBTYPES,
    draw_face,
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
    return {label: [draw_face(label, [7, 0, li, i], size=32)[1] for i in range(DRAWS)]
            for li, label in enumerate(LABELS)}


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
