"""Pretrained backbones from keras.applications, and where their ImageNet weights come from.

`train --backbone mobilenet_v2|mobilenet_v3_small|efficientnet_b0 --weights imagenet|<file>|none`
builds one of these without its classification top. All take pixels in 0..255: the last two scale
them with their own Rescaling/Normalization layers, MobileNetV2 (which wants -1..1) gets a Rescaling
in front (train.pretrained), so the one preprocessing function and the served model's contract stay
the same as for the CNN trained from scratch.

MobileNetV2 can also keep ImageNet's classifier (`head=imagenet`): then the weights must include the
top, and `load` returns that Dense layer's weights beside the backbone.

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
    md5: str | None  # as keras.applications checks it (it checks none for MobileNetV2)
    top_file: str = ""  # with ImageNet's classifier (include_top=True), where Keras has one
    top_origin: str = ""
    scale_inputs: bool = False  # True: wants -1..1, so the model scales 0..255 pixels in front of it


_MOBILENET_V2 = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
BACKBONES = {
    "mobilenet_v2": Backbone(
        "MobileNetV2",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        _MOBILENET_V2 + "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        None,
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
        _MOBILENET_V2 + "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
        scale_inputs=True,
    ),
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
NEW_HEAD, IMAGENET_HEAD = "new", "imagenet"
HEADS = (NEW_HEAD, IMAGENET_HEAD)


class WeightsUnavailable(ValueError):
    """The requested weights cannot be had here; the message says what to do, in one line."""


def check(backbone: str, weights: str, head: str = NEW_HEAD) -> None:
    """Reject an unknown backbone or head, or a weights file that does not exist, before any data is read."""
    if backbone not in CHOICES:
        raise ValueError(f"unknown backbone {backbone!r}: choose one of {', '.join(CHOICES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    if head == IMAGENET_HEAD and (backbone == CNN or not BACKBONES[backbone].top_file or weights == NO_WEIGHTS):
        raise ValueError(
            f"head=imagenet needs ImageNet's classifier: backbone=mobilenet_v2 with weights=imagenet or a file with its top "
            f"(got backbone={backbone}, weights={weights})"
        )
    if backbone != CNN and weights not in (IMAGENET, NO_WEIGHTS) and not Path(weights).is_file():
        raise WeightsUnavailable(f"weights file not found: {weights} (give imagenet, none or a weights file)")


def keras_cache() -> Path:
    """Keras' cache folder for downloaded weights, as keras.utils.get_file uses it."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def download(backbone: Backbone, cache: Path, top: bool = False) -> str:
    """The ImageNet weights file, fetched into Keras' cache unless it is there already."""
    import keras

    file, origin = (backbone.top_file, backbone.top_origin) if top else (backbone.file, backbone.origin)
    return keras.utils.get_file(file, origin, cache_subdir=cache.name, cache_dir=str(cache.parent), file_hash=None if top else backbone.md5)


def weights_file(name: str, weights: str, head: str = NEW_HEAD) -> str | None:
    """The file to load into backbone `name`: imagenet (from Keras' cache, downloaded if need be;
    the file with ImageNet's classifier for head=imagenet), a path, or None for random initialisation."""
    check(name, weights, head)
    if weights == NO_WEIGHTS:
        return None
    if weights != IMAGENET:
        return weights
    backbone, cache, top = BACKBONES[name], keras_cache(), head == IMAGENET_HEAD
    file, origin = (backbone.top_file, backbone.top_origin) if top else (backbone.file, backbone.origin)
    try:
        return download(backbone, cache, top)
    except Exception as error:  # keras.utils.get_file raises a bare Exception when offline
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise WeightsUnavailable(
            f"weights=imagenet for {name}: {file} is not in {cache} and cannot be downloaded "
            f"({reason}); put that file (from {origin}) into {cache}/, or pass weights=<path "
            f"to it>, or weights=none"
        ) from None


def build(name: str, weights: str, image_size: int):
    """The backbone without its top: (image_size, image_size, 3) pixels -> feature maps."""
    return load(name, weights, image_size)[0]


def load(name: str, weights: str, image_size: int, head: str = NEW_HEAD):
    """(the backbone without its top, ImageNet's classifier as [kernel, bias] or None).

    A weights file may hold the top or not: it is loaded into the network with its top first, and
    into the one without if that does not fit. The classifier comes back only if the file had it."""
    import keras

    path = weights_file(name, weights, head)
    constructor = getattr(keras.applications, BACKBONES[name].constructor)
    shape = (image_size, image_size, 3)
    # Built without weights, then loaded: the same path for ImageNet's file and for a user's own.
    model = constructor(input_shape=shape, include_top=False, weights=None)
    if path is None:
        return model, None
    if BACKBONES[name].top_file:
        with_top = constructor(input_shape=shape, include_top=True, weights=None)
        try:
            with_top.load_weights(path)
        except ValueError:  # no top in the file (or not this network: the load below says so)
            pass
        else:
            for layer in model.layers:  # the same layers, by name, in both (the input's aside)
                if layer.weights:
                    layer.set_weights(with_top.get_layer(layer.name).get_weights())
            return model, with_top.get_layer("predictions").get_weights()
    model.load_weights(path)
    if head == IMAGENET_HEAD:
        raise WeightsUnavailable(f"head=imagenet: {path} has no ImageNet classifier (its top); give a weights file with it")
    return model, None
