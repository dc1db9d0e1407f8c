"""The model card: what a model was trained on, how good it is, and what it is not for.

Written twice. At training time (`train.log_training`) the run gets the facts (`model_card.json`)
and the card (`model_card.md`). At registration (`register.register`) the facts gain the
registry's name and version and the validation figures of `mlflow.models.evaluate`, and the card
goes where a person looks for it: the version's description, and `model_card.md` /
`model_card.json` among the registered model's own artifacts (models:/m-<id>/...). The web page's
footer and `GET /api/model` read those facts (web/model_info.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

FACTS_FILE = "model_card.json"
CARD_FILE = "model_card.md"
SYNTHETIC = "synthetic"
FAMILIARITY_METHOD = (
    "Mahalanobis distance to the nearest class (shared covariance) on the network's "
    "pooled layer activations; calibrated on the validation split"
)
MASS_METHOD = (
    "1 - the probability mass ImageNet's own classifier puts on its cat, dog and wild classes "
    "(the network's animal_mass output); calibrated on the validation split, never flagged at a "
    "mass of 0.5 or more. Chosen over the "
    "Mahalanobis distance because, measured on real photos, photos of other things and synthetic "
    "drawings, the mass separates them with a wide gap, and needs no training photos to fit "
    "(docs/real-photos.md)"
)


def training_facts(
    frame: pd.DataFrame,
    labels: list[str],
    content_hash: str,
    image_size: int,
    accuracy: float,
    per_class: dict[str, float],
    confusion: list[list[int]],
    threshold: float,
    flag_share: float,
    val_unfamiliar_share: float,
    hyperparameters: dict | None,
    run_id: str | None = None,
    method: str = FAMILIARITY_METHOD,
) -> dict:
    """The facts known when a model is trained. `frame`: the catalogue (split, label, source);
    `per_class`: the share of each class's validation images predicted right (recall)."""
    sources = sorted(frame.source.unique())
    counts = {
        split: {label: int(((frame.split == split) & (frame.label == label)).sum()) for label in labels} for split in ("train", "val")
    }
    facts = {
        "model": {"name": None, "version": None, "run_id": run_id},
        "data": {
            "source": ", ".join(sources),
            "synthetic": sources == [SYNTHETIC],
            "images": counts,
            "image_size": image_size,
            "catalogue_sha256": content_hash,
        },
        "validation": {
            "accuracy": accuracy,
            "accuracy_per_class": per_class,
            "confusion_matrix": {"labels": labels, "rows": confusion},
            "images": sum(counts["val"].values()),
            "evaluated_by": "train",
        },
        "familiarity": {
            "method": method,
            "threshold": threshold,
            "flag_share": flag_share,
            "val_unfamiliar_share": val_unfamiliar_share,
        },
        "hyperparameters": hyperparameters or {},
    }
    facts["limits"] = limits(facts)
    return facts


def limits(facts: dict) -> list[str]:
    """The model's known limits, in plain words."""
    data, labels = facts["data"], facts["validation"]["confusion_matrix"]["labels"]
    said = []
    if data["synthetic"]:
        said.append(
            "Trained on synthetic drawings of animal faces, not on photos: it is not for real photos. "
            "On a photo its answer is a guess, however confident it looks."
        )
    said.append(
        f"It knows {len(labels)} classes ({', '.join(labels)}) and gives one of them for any image, "
        "a person or a car included. `unfamiliar` marks images unlike the training data; it catches "
        "most such images, not all, and it also flags about "
        f"{facts['familiarity']['flag_share']:.0%} of images like the training data."
    )
    said.append(
        f"The validation accuracy was measured on {facts['validation']['images']} images from the same "
        f"source as the training images ({data['source']}): it says how the model does on images like "
        "those, not on others."
    )
    if facts["validation"]["images"] < 100:
        said.append("The validation split is small: the accuracy is a rough figure.")
    backbone = (facts["hyperparameters"] or {}).get("backbone")
    if backbone and backbone != "cnn":
        said.append(
            f"Its {backbone} backbone was pretrained (weights: {facts['hyperparameters'].get('weights')}); "
            "what that data holds shapes what the model sees."
        )
    return said


def registered_facts(
    facts: dict,
    name: str,
    version: str,
    run_id: str | None,
    accuracy: float,
    per_class: dict[str, dict[str, float]],
    confusion: dict,
    images: int,
) -> dict:
    """The training facts with the registry's name and version and the gate's evaluation."""
    facts = json.loads(json.dumps(facts))  # a copy
    facts["model"].update({"name": name, "version": str(version), "run_id": facts["model"].get("run_id") or run_id})
    facts["validation"].update(
        {
            "accuracy": accuracy,
            "accuracy_per_class": {k: v["recall"] for k, v in per_class.items()},
            "precision_recall": per_class,
            "confusion_matrix": confusion,
            "images": images,
            "evaluated_by": "mlflow.models.evaluate",
        }
    )
    facts["limits"] = limits(facts)
    return facts


def render(facts: dict) -> str:
    """The card as Markdown."""
    model, data, val, fam = facts["model"], facts["data"], facts["validation"], facts["familiarity"]
    labels = val["confusion_matrix"]["labels"]
    title = f"{model['name']} version {model['version']}" if model.get("version") else "animal (not registered yet)"
    lines = [f"# Model card: {title}", ""]
    if model.get("run_id"):
        lines += [f"Training run: `{model['run_id']}`", ""]
    lines += [
        "## Training data",
        "",
        f"- Source: **{data['source']}**" + (" (synthetic drawings)" if data["synthetic"] else ""),
        "- Images per class: "
        + "; ".join(f"{split} " + ", ".join(f"{label} {n}" for label, n in data["images"][split].items()) for split in ("train", "val")),
        f"- Image size: {data['image_size']} x {data['image_size']} pixels",
        f"- Catalogue hash (sha256): `{data['catalogue_sha256']}`",
        "",
        "## Validation",
        "",
        f"- Accuracy: **{val['accuracy']:.4f}** on {val['images']} images ({val['evaluated_by']})",
        "",
    ]
    precision_recall = val.get("precision_recall")
    lines += [
        "| class | accuracy (recall) |" + (" precision |" if precision_recall else ""),
        "|---|---|" + ("---|" if precision_recall else ""),
    ]
    for label in labels:
        row = f"| {label} | {val['accuracy_per_class'][label]:.4f} |"
        if precision_recall:
            row += f" {precision_recall[label]['precision']:.4f} |"
        lines.append(row)
    lines += [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    lines += [f"| **{label}** | " + " | ".join(str(n) for n in row) + " |" for label, row in zip(labels, val["confusion_matrix"]["rows"])]
    lines += [
        "",
        "## Unfamiliar images",
        "",
        f"- Method: {fam['method']}",
        f"- Threshold: distance {fam['threshold']:.4g}: an image farther than that is `unfamiliar` "
        f"(familiarity below {fam['flag_share']:.2f}); {fam['val_unfamiliar_share']:.1%} of the validation "
        "images are",
        "",
        "## Hyperparameters",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts["hyperparameters"].items()] or ["- (not recorded)"]
    lines += ["", "## Known limits", ""] + [f"- {limit}" for limit in facts["limits"]]
    return "\n".join(lines) + "\n"


def logged_model_id(version) -> str | None:
    """The logged model (m-<id>) behind a registered version, if it came from one."""
    model_id = getattr(version, "model_id", None)
    source = version.source or ""
    if not model_id and source.startswith("models:/m-") and "/" not in source.removeprefix("models:/"):
        model_id = source.removeprefix("models:/")
    return model_id


def publish(client, name: str, version: str, facts: dict) -> None:
    """Put the card on a registered version: its description, and model_card.md / model_card.json
    among the registered model's artifacts (falling back to its run's when it has no logged model)."""
    card = render(facts)
    client.update_model_version(name, version, description=card)
    registered = client.get_model_version(name, version)
    model_id = logged_model_id(registered)
    with tempfile.TemporaryDirectory() as folder:
        for file, text in ((CARD_FILE, card), (FACTS_FILE, json.dumps(facts, indent=2))):
            path = Path(folder) / file
            path.write_text(text)
            if model_id:
                client.log_model_artifact(model_id, str(path))
            elif registered.run_id:
                client.log_artifact(registered.run_id, str(path))
