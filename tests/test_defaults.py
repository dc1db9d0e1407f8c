"""Every default is defined once, in code: the MLproject's defaults must be the CLIs' defaults, which
come from steps/defaults.py. A difference means `mlflow run` and `python -m steps.X` train differently."""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import asdict
from pathlib import Path

import keras_tuner as kt
import pytest
import yaml

from steps import defaults
from tests.conftest import ROOT

MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def cli_defaults(command: str) -> dict[str, object]:
    """{MLproject parameter: the default of the flag it is passed to} for one entry point's command."""
    module = re.match(r"python -m ([\w.]+)", command).group(1)
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    by_flag = {option: action for action in parser._actions for option in action.option_strings}
    return {param: by_flag[flag].default for flag, param in re.findall(r"(--[\w-]+) \{(\w+)\}", command)}


def same(mlproject_default, code_default) -> bool:
    if isinstance(code_default, bool):
        return str(mlproject_default).lower() == str(code_default).lower()
    if isinstance(code_default, (int, float)):
        return float(mlproject_default) == float(code_default)
    return str(mlproject_default) == str(code_default)


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_every_mlproject_default_is_the_code_default(entry_point):
    spec = ENTRY_POINTS[entry_point]
    code = cli_defaults(spec["command"])
    assert set(code) == set(spec["parameters"]), "every parameter is passed to a flag, and only those"
    for param, declared in spec["parameters"].items():
        if not isinstance(declared, dict) or "default" not in declared:
            continue  # required parameter (no default on either side)
        assert same(declared["default"], code[param]), (
            f"MLproject {entry_point}.{param} = {declared['default']!r}, code default = {code[param]!r}"
        )


def test_main_and_train_take_the_same_hyperparameters():
    hyperparameters = set(asdict(defaults.Hyperparameters()))
    assert hyperparameters <= set(ENTRY_POINTS["train"]["parameters"])
    assert hyperparameters <= set(ENTRY_POINTS["main"]["parameters"])


def test_the_search_space_starts_from_the_train_defaults():
    from steps.tune import hyperparameters

    assert hyperparameters(kt.HyperParameters()) == defaults.Hyperparameters()


SETS_TF_ENVIRONMENT = re.compile(r"""(setdefault\(|environ\[|env\[)\s*["']TF_|TF_ENABLE_ONEDNN_OPTS["']?\s*[:=,]\s*["']?0""")


def test_no_module_sets_the_tensorflow_environment_but_pyfunc():
    setters = [
        path.relative_to(ROOT)
        for folder in ("steps", "pyfunc", "web", "bench", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if path != ROOT / "pyfunc" / "__init__.py"
        and path != Path(__file__)
        and not path.is_relative_to(ROOT / "bench" / "results")  # git-ignored: saved models' code copies
        and SETS_TF_ENVIRONMENT.search(path.read_text())
    ]
    assert setters == []
    assert "ONEDNN" not in (ROOT / "Makefile").read_text()


def run_main(monkeypatch, tmp_path, *args: str) -> dict[str, dict]:
    """steps.main with its steps replaced by a recorder: {entry point: the parameters it was given}."""
    from steps import main as pipeline

    sent: dict[str, dict] = {}

    class Finished:  # what run_step returns: a finished run with the model's tag
        data = type("data", (), {"tags": {pipeline.MODEL_TAG: "models:/m-test"}})()
        info = type("info", (), {"run_id": "r"})()

    def fake_step(entry_point: str, parameters: dict):
        sent[entry_point] = parameters
        return Finished()

    promotion = type("Promotion", (), {"accuracy": 1.0, "promoted": True, "version": "1", "reason": "test"})()
    monkeypatch.setattr(pipeline, "run_step", fake_step)
    monkeypatch.setattr(pipeline, "register", lambda *args, **kwargs: promotion)
    assert pipeline.main([*args, "--db", str(tmp_path / "c.db"), "--data-dir", str(tmp_path)]) == 0
    return sent


def test_main_forwards_every_train_parameter(monkeypatch, tmp_path):
    """`mlflow run . -P conv_blocks=4` on main reaches train (the steps themselves are not run here)."""
    sent = run_main(monkeypatch, tmp_path, "--conv-blocks", "4", "--learning-rate", "0.001")
    expected = {**asdict(defaults.Hyperparameters()), "conv_blocks": 4, "learning_rate": 0.001}
    assert {name: sent["train"][name] for name in expected} == expected
    assert sent["train"]["epochs"] == defaults.EPOCHS and sent["train"]["patience"] == defaults.PATIENCE


def test_main_forwards_synthetic_size_to_extract(monkeypatch, tmp_path):
    """`mlflow run . -P images_per_class=5000 -P synthetic_size=512` reaches extract."""
    sent = run_main(monkeypatch, tmp_path, "--images-per-class", "5000", "--synthetic-size", "512")
    assert sent["extract"]["synthetic_size"] == 512 and sent["extract"]["images_per_class"] == 5000


@pytest.mark.parametrize("module, flag", [("steps.promote", "--force"), ("steps.tune", "--overwrite")])
def test_yes_no_flags_take_mlproject_strings_and_reject_typos(module, flag, capsys):
    """MLproject passes "true"/"false"; a typo is an error, not a quiet false."""
    parser = importlib.import_module(module).build_parser()
    required = ["--version", "3"] if module == "steps.promote" else []
    for text, value in (("true", True), ("False", False), (" yes", True), ("0", False)):
        assert getattr(parser.parse_args([*required, flag, text]), flag[2:]) is value
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*required, flag, "ture"])
    assert exit_info.value.code == 2 and "expected true or false, got 'ture'" in capsys.readouterr().err


def test_main_puts_the_images_where_image_store_says(monkeypatch, tmp_path):
    """Without image_store, <data_dir>/images (a resolved path: the steps run in the project folder);
    with a bucket, extract and populate both get the bucket, as given; the metadata stays in data_dir."""
    sent = run_main(monkeypatch, tmp_path)
    assert sent["extract"]["image_store"] == sent["populate"]["image_store"] == (tmp_path / "images").resolve()
    bucket = "s3://animal-images/afhq"
    sent = run_main(monkeypatch, tmp_path, "--image-store", bucket)
    assert sent["extract"]["image_store"] == sent["populate"]["image_store"] == bucket
    assert sent["populate"]["metadata"] == (tmp_path / "metadata.csv").resolve()
    sent = run_main(monkeypatch, tmp_path, "--image-store", "elsewhere/images")
    assert sent["extract"]["image_store"] == Path("elsewhere/images").resolve()
