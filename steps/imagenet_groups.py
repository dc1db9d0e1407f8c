"""ImageNet's classes that are animal faces of ours: which of Keras' 1000 outputs are a cat, a dog or
a wild animal, written once, by index and name (Keras' class order: 0-based, no background class).

`head=imagenet` (steps/train.py) starts the model's three outputs as ImageNet's softmax summed over
these groups and renormalised over the three; the mass left outside the three groups is the
pretrained model's measure of "not an animal face" (pyfunc/familiarity.py, signal "mass").
"""

from __future__ import annotations

import numpy as np

IMAGENET_CLASSES = 1000

# index -> ImageNet's name, 151..299: every class from the first dog to the meerkat.
NAMES = {
    index: name
    for index, name in enumerate(
        [
            "Chihuahua",
            "Japanese spaniel",
            "Maltese dog",
            "Pekinese",
            "Shih-Tzu",
            "Blenheim spaniel",
            "papillon",
            "toy terrier",
            "Rhodesian ridgeback",
            "Afghan hound",
            "basset",
            "beagle",
            "bloodhound",
            "bluetick",
            "black-and-tan coonhound",
            "Walker hound",
            "English foxhound",
            "redbone",
            "borzoi",
            "Irish wolfhound",
            "Italian greyhound",
            "whippet",
            "Ibizan hound",
            "Norwegian elkhound",
            "otterhound",
            "Saluki",
            "Scottish deerhound",
            "Weimaraner",
            "Staffordshire bullterrier",
            "American Staffordshire terrier",
            "Bedlington terrier",
            "Border terrier",
            "Kerry blue terrier",
            "Irish terrier",
            "Norfolk terrier",
            "Norwich terrier",
            "Yorkshire terrier",
            "wire-haired fox terrier",
            "Lakeland terrier",
            "Sealyham terrier",
            "Airedale",
            "cairn",
            "Australian terrier",
            "Dandie Dinmont",
            "Boston bull",
            "miniature schnauzer",
            "giant schnauzer",
            "standard schnauzer",
            "Scotch terrier",
            "Tibetan terrier",
            "silky terrier",
            "soft-coated wheaten terrier",
            "West Highland white terrier",
            "Lhasa",
            "flat-coated retriever",
            "curly-coated retriever",
            "golden retriever",
            "Labrador retriever",
            "Chesapeake Bay retriever",
            "German short-haired pointer",
            "vizsla",
            "English setter",
            "Irish setter",
            "Gordon setter",
            "Brittany spaniel",
            "clumber",
            "English springer",
            "Welsh springer spaniel",
            "cocker spaniel",
            "Sussex spaniel",
            "Irish water spaniel",
            "kuvasz",
            "schipperke",
            "groenendael",
            "malinois",
            "briard",
            "kelpie",
            "komondor",
            "Old English sheepdog",
            "Shetland sheepdog",
            "collie",
            "Border collie",
            "Bouvier des Flandres",
            "Rottweiler",
            "German shepherd",
            "Doberman",
            "miniature pinscher",
            "Greater Swiss Mountain dog",
            "Bernese mountain dog",
            "Appenzeller",
            "EntleBucher",
            "boxer",
            "bull mastiff",
            "Tibetan mastiff",
            "French bulldog",
            "Great Dane",
            "Saint Bernard",
            "Eskimo dog",
            "malamute",
            "Siberian husky",
            "dalmatian",
            "affenpinscher",
            "basenji",
            "pug",
            "Leonberg",
            "Newfoundland",
            "Great Pyrenees",
            "Samoyed",
            "Pomeranian",
            "chow",
            "keeshond",
            "Brabancon griffon",
            "Pembroke",
            "Cardigan",
            "toy poodle",
            "miniature poodle",
            "standard poodle",
            "Mexican hairless",
            "timber wolf",
            "white wolf",
            "red wolf",
            "coyote",
            "dingo",
            "dhole",
            "African hunting dog",
            "hyena",
            "red fox",
            "kit fox",
            "Arctic fox",
            "grey fox",
            "tabby",
            "tiger cat",
            "Persian cat",
            "Siamese cat",
            "Egyptian cat",
            "cougar",
            "lynx",
            "leopard",
            "snow leopard",
            "jaguar",
            "lion",
            "tiger",
            "cheetah",
            "brown bear",
            "American black bear",
            "ice bear",
            "sloth bear",
            "mongoose",
            "meerkat",
        ],  # fmt: skip
        start=151,
    )
}

CAT = tuple(range(281, 286))  # tabby .. Egyptian cat: the domestic cats
DOG = (*range(151, 269), 273)  # Chihuahua .. Mexican hairless, and the dingo
WILD = tuple(i for i in range(269, 300) if i not in CAT and i not in DOG)  # wolves, foxes, big cats, bears, ...
GROUPS = {"cat": CAT, "dog": DOG, "wild": WILD}


def group_matrix(labels: list[str]) -> np.ndarray:
    """(1000, len(labels)) of 0/1: ImageNet class i counts towards label j. Summing the softmax
    through it gives each label's mass; the labels must be groups of ours."""
    unknown = sorted(set(labels) - set(GROUPS))
    if unknown:
        raise ValueError(f"head=imagenet needs the labels cat, dog and wild; the catalogue has {', '.join(unknown)}")
    matrix = np.zeros((IMAGENET_CLASSES, len(labels)), np.float32)
    for j, label in enumerate(labels):
        matrix[list(GROUPS[label]), j] = 1.0
    return matrix


def members(labels: list[str]) -> np.ndarray:
    """The ImageNet classes of any of `labels`' groups, in index order."""
    return np.flatnonzero(group_matrix(labels).sum(axis=1))
