"""Pretrained backbones from keras.applications, and where their ImageNet weights come from.

`train --backbone mobilenet_v3_small|efficientnet_b0 --weights imagenet|<file>|none` builds one of
these without its classification top. Both take pixels in 0..255 and scale them inside the model
(their own Rescaling/Normalization layers), so the one preprocessing function and the served model's
contract stay the same as for the CNN trained from scratch.

ImageNet weights are the files Keras itself downloads into its cache (`~/.keras/models/`, or
`$KERAS_HOME/models/`). Without internet the download fails: we say, in one line, which file to put
there or to pass as `--weights <path>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CNN = "cnn"  # the project's own network, trained from scratch (steps/train.py)
IMAGENET, NO_WEIGHTS = "imagenet", "none"


@dataclass(frozen=True)
class Backbone:
    constructor: str  # the keras.applications function
    file: str  # the file Keras looks for in its cache (include_top=False)
    origin: str
    md5: str  # as keras.applications checks it


BACKBONES = {
    "mobilenet_v3_small": Backbone(
        "MobileNetV3Small",
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "d3e8ec802a04aa4fc771ee12a9a9b836",
    ),
    "efficientnet_b0": Backbone(
        "EfficientNetB0",
        "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d",
    ),
}
CHOICES = (CNN, *BACKBONES)


class WeightsUnavailable(ValueError):
    """The requested weights cannot be had here; the message says what to do, in one line."""


def check(backbone: str, weights: str) -> None:
    """Reject an unknown backbone or a weights file that does not exist, before any data is read."""
    if backbone not in CHOICES:
        raise ValueError(f"unknown backbone {backbone!r}: choose one of {', '.join(CHOICES)}")
    if backbone != CNN and weights not in (IMAGENET, NO_WEIGHTS) and not Path(weights).is_file():
        raise WeightsUnavailable(f"weights file not found: {weights} (give imagenet, none or a weights file)")


def keras_cache() -> Path:
    """Keras' cache folder for downloaded weights, as keras.utils.get_file uses it."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def download(backbone: Backbone, cache: Path) -> str:
    """The ImageNet weights file, fetched into Keras' cache unless it is there already."""
    import keras

    return keras.utils.get_file(
        backbone.file, backbone.origin, cache_subdir=cache.name, cache_dir=str(cache.parent), file_hash=backbone.md5
    )


def weights_file(name: str, weights: str) -> str | None:
    """The file to load into backbone `name`: imagenet (from Keras' cache, downloaded if need be),
    a path, or None for random initialisation."""
    check(name, weights)
    if weights == NO_WEIGHTS:
        return None
    if weights != IMAGENET:
        return weights
    backbone, cache = BACKBONES[name], keras_cache()
    try:
        return download(backbone, cache)
    except Exception as error:  # keras.utils.get_file raises a bare Exception when offline
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise WeightsUnavailable(
            f"weights=imagenet for {name}: {backbone.file} is not in {cache} and cannot be downloaded "
            f"({reason}); put that file (from {backbone.origin}) into {cache}/, or pass weights=<path "
            f"to it>, or weights=none"
        ) from None


def build(name: str, weights: str, image_size: int):
    """The backbone without its top: (image_size, image_size, 3) pixels in 0..255 -> feature maps."""
    import keras

    path = weights_file(name, weights)
    constructor = getattr(keras.applications, BACKBONES[name].constructor)
    # Built without weights, then loaded: the same path for ImageNet's file and for a user's own.
    model = constructor(input_shape=(image_size, image_size, 3), include_top=False, weights=None)
    if path is not None:
        model.load_weights(path)
    return model
