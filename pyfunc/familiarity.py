"""Familiarity: how much an image looks like the images the model was trained on.

The softmax's confidence cannot say it (a photo of a real cat gets 99.7% "wild" from a model
trained on drawings), nor can the cosine of the embedding (real photos score 0.96-0.997 against
drawings). What does separate is the distance to the training distribution in the network's own
feature space (Lee et al., 2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks"):

- features: the global average of layers' activations, each scaled to unit length and concatenated
  (for the CNN, every convolution block: low- and high-level statistics together; the last block
  alone, or the embedding, flags far fewer real photos: docs/performance.md);
- one Gaussian per class with a shared covariance (Ledoit-Wolf shrinkage), fitted on the training
  split at training time;
- distance: the smallest squared Mahalanobis distance to a class mean;
- calibration on the validation split: `familiarity` is the share of validation images that are at
  least as far (1: as typical as validation images get, 0: farther than every one of them), and an
  image is `unfamiliar` when its familiarity is below FLAG_SHARE, i.e. when it is farther than 95%
  of the validation images.

A model that kept ImageNet's classifier (`head=imagenet`) has a better signal of its own, signal
"mass": the distance is 1 minus the probability ImageNet's softmax puts on the cat, dog and wild
classes (the network's `animal_mass` output), calibrated on validation the same way. Measured on
real photos, photos of other things and drawings (docs/real-photos.md), it separates them where the
Mahalanobis distance, fitted on a few training photos, cannot. Calibrated on a few dozen photos, its
threshold also has a floor: an image at or below `floor` (mass at least 0.5) is never flagged, as
the least mass of 42 validation photos is a noisy estimate of where real faces end.

Only numpy is needed to score: the served model loads the fitted statistics from one .npz file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLAG_SHARE = 0.05  # of validation images flagged: the false-alarm rate on data like the training data
MAHALANOBIS, MASS = "mahalanobis", "mass"  # the two signals
# A validation image scored again (one image at a time, not in a batch of 256) comes out up to about
# 1e-6 farther: within this relative margin a distance counts as equal to a validation one, so that
# no validation image is flagged by rounding.
ROUNDING = 1e-4


def pooled(features: list[np.ndarray]) -> np.ndarray:
    """Layer activations -> one vector per image: each layer averaged over space (if it has space),
    scaled to unit length, then the layers concatenated."""
    parts = []
    for values in features:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 4:
            values = values.mean(axis=(1, 2))
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        parts.append(values / np.maximum(norms, 1e-12))
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class Familiarity:
    means: np.ndarray  # (classes, features), already whitened
    whitening: np.ndarray  # (features, features): L with L @ L.T = the inverse of the shared covariance
    reference: np.ndarray  # the validation images' distances, sorted
    flag_share: float = FLAG_SHARE
    signal: str = MAHALANOBIS
    floor: float = 0.0  # a distance at or below this is never flagged, whatever validation says

    @classmethod
    def fit_mass(cls, validation_mass: np.ndarray, flag_share: float, floor: float = 0.0) -> Familiarity:
        """Signal "mass": calibrated on the validation images' mass on the animal classes; `floor`:
        1 - the mass at or above which no image is flagged."""
        empty = np.zeros((0, 0), np.float32)
        return cls(empty, empty, np.sort(1.0 - np.asarray(validation_mass, np.float64).reshape(-1)), flag_share, MASS, floor)

    def features(self, taps: list[np.ndarray]) -> np.ndarray:
        """The network's familiarity outputs (with_embedding's taps) -> what `scores` takes."""
        return np.asarray(taps[0], np.float64).reshape(-1) if self.signal == MASS else pooled(taps)

    @classmethod
    def fit(cls, train: np.ndarray, labels: np.ndarray, validation: np.ndarray, flag_share: float = FLAG_SHARE) -> Familiarity:
        """Fit on pooled training features with their class indices; calibrate on validation's."""
        from sklearn.covariance import LedoitWolf  # training only: serving needs numpy alone

        train = np.asarray(train, dtype=np.float64)
        classes = np.unique(labels)
        means = np.zeros((int(classes.max()) + 1, train.shape[1]))
        for c in classes:
            means[c] = train[labels == c].mean(axis=0)
        # Shrinkage: a few hundred images per class cannot estimate a 448 x 448 covariance alone.
        covariance = LedoitWolf(assume_centered=True).fit(train - means[labels]).covariance_
        # Whitened once: a distance is then one matrix product and a sum of squares (about 0.05 ms
        # for one image, where the three-way product with the precision matrix took 12 ms).
        whitening = np.linalg.cholesky(np.linalg.inv(covariance)).astype(np.float32)
        means = means.astype(np.float32) @ whitening
        # Classes absent from training (none in practice) get an unreachable mean.
        means[np.setdiff1d(np.arange(len(means)), classes)] = np.inf
        unfitted = cls(means, whitening, np.zeros(0), flag_share)
        return cls(means, whitening, np.sort(unfitted.distances(validation)), flag_share)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean, per row of pooled features
        (signal "mass": 1 - the mass on the animal classes)."""
        if self.signal == MASS:
            return 1.0 - np.asarray(features, np.float64).reshape(-1)
        whitened = np.asarray(features, dtype=np.float32) @ self.whitening
        best = np.full(len(whitened), np.inf)
        for mean in self.means:
            if np.isfinite(mean).all():
                best = np.minimum(best, np.square(whitened - mean).sum(axis=1, dtype=np.float64))
        return best

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Familiarity: the share of validation images at least as far from the training data."""
        return self.scores_of_distances(self.distances(features))

    def scores_of_distances(self, distances: np.ndarray) -> np.ndarray:
        closer = np.searchsorted(self.reference, np.asarray(distances) * (1 - ROUNDING), side="left")
        return 1.0 - closer / len(self.reference)

    def unfamiliar(self, scores: np.ndarray) -> np.ndarray:
        """The validation rule alone (no floor): use `flagged` where the distances are at hand."""
        return np.asarray(scores) < self.flag_share

    def flagged(self, distances: np.ndarray) -> np.ndarray:
        """Unfamiliar: beyond what validation allows and beyond the floor."""
        distances = np.asarray(distances)
        return self.unfamiliar(self.scores_of_distances(distances)) & (distances > self.floor)

    @property
    def threshold(self) -> float:
        """The distance beyond which an image is unfamiliar (flag_share of validation lies beyond,
        give or take ROUNDING; never below the floor)."""
        index = min(int(np.floor(len(self.reference) * (1 - self.flag_share))), len(self.reference) - 1)
        return max(float(self.reference[index]), self.floor)

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            means=self.means,
            whitening=self.whitening,
            reference=self.reference,
            flag_share=np.float64(self.flag_share),
            signal=np.str_(self.signal),
            floor=np.float64(self.floor),
        )

    @classmethod
    def load(cls, path: str | Path) -> Familiarity:
        with np.load(path) as stored:
            signal = str(stored["signal"]) if "signal" in stored.files else MAHALANOBIS  # older models: no signal stored
            floor = float(stored["floor"]) if "floor" in stored.files else 0.0  # older models: none
            return cls(stored["means"], stored["whitening"], stored["reference"], float(stored["flag_share"]), signal, floor)
