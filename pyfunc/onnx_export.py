"""Training side only: the served network (with_embedding's model) as an ONNX graph, checked
against Keras before it is logged.

This module imports TensorFlow and tf2onnx; the served model never imports it (pyfunc/model.py
reads the .onnx file with ONNX Runtime alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The graph takes the uint8 pixels `load_image` returns, as the Keras network does (its first
# layer casts them): the served preprocessing is the same array both ways.
INPUT_NAME = "x"
# How far ONNX Runtime may be from Keras, relative to each output's scale (its largest magnitude,
# at least 1): float32 arithmetic in another order of operations, 1.6e-6 measured (docs/design.md);
# a wrong graph is off by far more than this.
TOLERANCE = 1e-4
CHECK_IMAGES = 256  # validation images compared: one batch, seconds even for MobileNetV2 on 2 cores


class ExportMismatch(ValueError):
    """The ONNX graph does not answer as the Keras network does; the message says by how much."""


def export(network, image_size: int, path: Path) -> list[str]:
    """Write `network` (every output it has) to `path` as ONNX; returns the graph's output names,
    in the network's output order."""
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, image_size, image_size, 3), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(network, input_signature=signature, output_path=str(path))
    names = [output.name for output in proto.graph.output]
    if len(names) != len(network.outputs):
        raise ExportMismatch(f"the ONNX export has {len(names)} outputs, the network {len(network.outputs)}")
    return names


def check(network, path: Path, outputs: list[str], images: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """The largest difference between the ONNX graph at `path` and `network` on `images` (uint8),
    relative to each output's scale; raises ExportMismatch, in one line, beyond `tolerance`."""
    import onnxruntime

    images = np.asarray(images[:CHECK_IMAGES], dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(outputs, {INPUT_NAME: images})
    expected = network.predict(images, batch_size=64, verbose=0)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    errors = {}
    for name, got, want in zip(outputs, exported, expected):
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            errors[name] = float("inf")
            continue
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        error = float(np.abs(got.astype(np.float64) - want).max(initial=0.0)) / scale
        errors[name] = error if np.isfinite(error) else float("inf")  # NaN counts as the worst
    where = max(errors, key=errors.get)
    worst = errors[where]
    if not worst <= tolerance:
        raise ExportMismatch(
            f"the ONNX export differs from the Keras model by {worst:.3g} (output {where!r}, relative to its scale; "
            f"tolerance {tolerance:g}) on {len(images)} validation images: not logged"
        )
    return worst


def export_checked(network, image_size: int, path: Path, images: np.ndarray) -> tuple[list[str], float]:
    """export + check: (output names, largest relative difference)."""
    outputs = export(network, image_size, path)
    return outputs, check(network, path, outputs, images)
