"""Familiarity on known distributions: calibrated on validation, far points flagged, stored exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pyfunc.familiarity import FLAG_SHARE, ROUNDING, Familiarity, pooled

DIM = 12


def clusters(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, each a correlated Gaussian around its own centre."""
    labels = rng.integers(0, 3, n)
    mixing = np.eye(DIM) + 0.3 * np.ones((DIM, DIM)) / DIM
    points = rng.normal(size=(n, DIM)) @ mixing + 4 * np.eye(3, DIM)[labels]
    return points, labels


@pytest.fixture(scope="module")
def fitted() -> Familiarity:
    rng = np.random.default_rng(0)
    train, labels = clusters(rng, 3000)
    validation, _ = clusters(rng, 2000)
    return Familiarity.fit(train, labels, validation)


def test_about_five_percent_of_validation_and_of_fresh_data_are_flagged(fitted):
    assert len(fitted.reference) == 2000 and np.all(np.diff(fitted.reference) >= 0)
    fresh, _ = clusters(np.random.default_rng(1), 4000)
    for share in (fitted.unfamiliar(fitted.scores(fresh)).mean(), (fitted.distances(fresh) > fitted.threshold).mean()):
        assert FLAG_SHARE - 0.015 < share < FLAG_SHARE + 0.015


def test_far_points_are_unfamiliar_and_scores_fall_with_distance(fitted):
    rng = np.random.default_rng(2)
    far = rng.normal(size=(200, DIM)) + 12.0
    assert fitted.unfamiliar(fitted.scores(far)).all() and (fitted.scores(far) == 0).all()
    centre = np.eye(3, DIM)[1] * 4
    line = centre + np.linspace(0, 15, 30)[:, None] * np.eye(DIM)[5]
    scores = fitted.scores(line)
    assert scores[0] > 0.5 and np.all(np.diff(scores) <= 0)


def test_unfamiliar_is_exactly_beyond_the_threshold(fitted):
    points, _ = clusters(np.random.default_rng(3), 3000)
    assert np.array_equal(fitted.unfamiliar(fitted.scores(points)), fitted.distances(points) * (1 - ROUNDING) > fitted.threshold)


def test_a_validation_image_scored_again_is_not_flagged_by_rounding(fitted):
    """The farthest validation image not flagged... and a hair farther still not: only beyond the margin."""
    top = int(np.floor(len(fitted.reference) * (1 - FLAG_SHARE)))
    border = fitted.reference[top]
    scores = fitted.scores_of_distances(np.array([border, border * (1 + 1e-6), border * (1 + 1e-3)]))
    assert list(fitted.unfamiliar(scores)) == [False, False, True]


def test_save_and_load_give_the_same_answers(fitted, tmp_path):
    fitted.save(tmp_path / "familiarity.npz")
    loaded = Familiarity.load(tmp_path / "familiarity.npz")
    points, _ = clusters(np.random.default_rng(4), 100)
    assert np.array_equal(loaded.scores(points), fitted.scores(points))
    assert loaded.threshold == fitted.threshold and loaded.flag_share == fitted.flag_share


def test_pooled_averages_space_and_scales_each_layer_to_unit_length():
    maps = np.arange(2 * 3 * 3 * 4, dtype=float).reshape(2, 3, 3, 4)
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]])
    out = pooled([maps, vectors])
    assert out.shape == (2, 6)
    np.testing.assert_allclose(np.linalg.norm(out[:, :4], axis=1), 1)
    np.testing.assert_allclose(out[0, 4:], [0.6, 0.8])
    assert np.isfinite(out).all()  # an all-zero layer stays zero, not NaN


def test_the_mass_signal_flags_nothing_at_or_under_its_floor():
    """Validation's least mass is 0.65; with a floor at distance 0.5 (mass 0.5) an image of mass 0.6 is
    farther than every validation image (familiarity 0) yet not flagged; one of mass 0.4 is."""
    validation_mass = np.linspace(0.65, 0.98, 42)
    floored = Familiarity.fit_mass(validation_mass, 0.01, floor=0.5)
    plain = Familiarity.fit_mass(validation_mass, 0.01)
    mass = np.array([0.9, 0.6, 0.5, 0.4, 0.0])
    distances = floored.distances(mass)
    assert list(floored.scores_of_distances(distances) == 0) == [False, True, True, True, True]
    assert list(floored.flagged(distances)) == [False, False, False, True, True]
    assert list(plain.flagged(plain.distances(mass))) == [False, True, True, True, True]
    assert floored.threshold == 0.5 and plain.threshold == pytest.approx(0.35)
    assert not floored.flagged(floored.distances(validation_mass)).any()


def test_the_floor_is_stored_and_older_files_have_none(tmp_path):
    floored = Familiarity.fit_mass(np.linspace(0.65, 0.98, 42), 0.01, floor=0.5)
    floored.save(tmp_path / "familiarity.npz")
    assert Familiarity.load(tmp_path / "familiarity.npz").floor == 0.5
    with np.load(tmp_path / "familiarity.npz") as stored:
        np.savez(tmp_path / "older.npz", **{key: stored[key] for key in stored.files if key != "floor"})
    assert Familiarity.load(tmp_path / "older.npz").floor == 0.0
