"""steps.train.Augmentation: Keras's random flip, rotation, zoom and translation, composed into one
resampling, then contrast. The composition must be the same geometry as the four applied in turn."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from steps.train import Augmentation, compose


def smooth_images(n: int = 8, size: int = 48) -> tf.Tensor:
    """Gradients and a blob: smooth enough that one bilinear resampling and three agree closely."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 2, 3)
        blob = np.exp(-((x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2) * 20)
        images.append(np.stack([255 * x * a % 255, 255 * y * b % 255, 255 * blob * c % 255], axis=-1))
    return tf.constant(np.clip(np.array(images), 0, 255), tf.float32)


def apply(images: tf.Tensor, transform: tf.Tensor) -> np.ndarray:
    return np.asarray(keras.ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect"))


def test_one_composed_transform_is_the_four_in_turn():
    images = smooth_images()
    matrices = Augmentation(0.05, seed=3).matrices(images)
    in_turn = images
    for matrix in matrices:
        in_turn = apply(in_turn, compose(matrix))
    at_once = apply(images, compose(*matrices))
    inner = (slice(None), slice(8, -8), slice(8, -8))  # borders differ: reflected once, not thrice
    assert np.abs(at_once[inner] - in_turn[inner]).mean() < 2.0  # of 255: interpolation only


def test_the_flip_is_exact_and_the_identity_is_the_identity():
    images = smooth_images(2)
    width = images.shape[2]
    flip = tf.constant([[-1, 0, width - 1, 0, 1, 0, 0, 0]] * 2, tf.float32)
    np.testing.assert_allclose(apply(images, flip), images.numpy()[:, :, ::-1], atol=1e-3)
    identity = tf.constant([[1, 0, 0, 0, 1, 0, 0, 0]] * 2, tf.float32)
    np.testing.assert_allclose(
        apply(images, compose(*[tf.reshape(tf.concat([identity, tf.ones([2, 1])], 1), [-1, 3, 3])] * 3)), images.numpy(), atol=1e-3
    )


def test_augmentation_varies_images_within_range_and_is_off_out_of_training():
    images = smooth_images()
    augment = Augmentation(0.05, seed=1)
    out = np.asarray(augment(images, training=True))
    assert out.shape == tuple(images.shape) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert np.abs(out - images.numpy()).mean() > 1  # it does something
    assert augment(images, training=False) is images


def test_random_transforms_stay_in_the_layers_ranges():
    images = smooth_images(64)
    flip, rotation, zoom, translation = (m.numpy() for m in Augmentation(0.05, seed=2).matrices(images))
    assert set(np.round(flip[:, 0, 0])) == {-1.0, 1.0}  # both sides drawn
    angles = np.degrees(np.arctan2(rotation[:, 1, 0], rotation[:, 0, 0]))
    assert np.abs(angles).max() <= 18.01  # 0.05 of a full turn
    assert zoom[:, 0, 0].min() >= 0.95 and zoom[:, 0, 0].max() <= 1.05
    assert np.abs(translation[:, :2, 2]).max() <= 0.025 * images.shape[1] + 1e-4
