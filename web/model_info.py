"""What the page says about its model: the model card's facts of the registry's Production version.

The page talks to the scoring server by URL only, and `mlflow models serve` does not say which
version it loaded. The registry does know which version is Production, and registration put that
version's card facts (`model_card.json`, steps/model_card.py) among its artifacts. So the page
reads `models:/animal@production/model_card.json` from the MLflow tracking store the pipeline
wrote: `MLFLOW_TRACKING_URI` (MLflow's own variable, as for every other MLflow command), else the
project's default `sqlite:///mlflow.db` in the working folder. The answer is kept for a minute.

If the scoring server was started from another version, or Production changed since it started,
the footer describes the version that is Production now; `make serve` serves Production, so the two
agree unless someone promotes while the page runs. If the registry cannot be read, the page keeps
working and its footer names only the model.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from steps import defaults

log = logging.getLogger(__name__)

TTL = 60.0  # seconds a card is kept; a promotion shows up within this
FACTS_FILE = "model_card.json"  # steps.model_card.FACTS_FILE (not imported: that module needs pandas)


def version_author(client, version) -> str:
    """Who made a version: its run's `mlflow.user` (the tracking login that logged it, as the client
    reported it), or "unknown" when the run is gone or unreadable."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(version.run_id).data.tags.get("mlflow.user", "unknown") if version.run_id else "unknown"
    except MlflowException:
        return "unknown"


def served_version(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """ "<name> version <n> (run <id>, by <user>)" for a registry URI (models:/name@alias,
    models:/name/Stage or models:/name/<n>), None for any other URI or if the registry cannot say."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/") or model_uri.startswith("models:/m-"):
        return None
    name, _, rest = model_uri.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or defaults.TRACKING_URI
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        elif rest.isdigit():
            version = client.get_model_version(name, rest)
        else:
            found = client.get_latest_versions(name, stages=[rest])
            if not found:
                return None
            version = found[0]
    except MlflowException:
        return None
    return f"{name} version {version.version} (run {version.run_id}, by {version_author(client, version)})"


class ModelInfo:
    """The Production version's card facts, read from the registry and cached."""

    def __init__(self, tracking_uri: str | None = None, name: str = defaults.MODEL_NAME, alias: str = defaults.ALIAS, ttl: float = TTL):
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or defaults.TRACKING_URI
        self.name, self.alias, self.ttl = name, alias, ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, dict | None, str | None] = (float("-inf"), None, None)
        self._described: str | None = None  # the version last logged as the one the page describes

    def facts(self) -> tuple[dict | None, str | None]:
        """(the card's facts, None), or (None, why they cannot be had); read now if stale."""
        with self._lock:
            when, facts, problem = self._cached
            if time.monotonic() - when > self.ttl:
                facts, problem = self._read()
                self._cached = (time.monotonic(), facts, problem)
            return facts, problem

    def refresh_soon(self) -> None:
        """Read the card in the background if stale: the first read (importing MLflow, opening
        the store) takes seconds, which a page should not wait for."""
        if time.monotonic() - self._cached[0] > self.ttl and not self._lock.locked():
            threading.Thread(target=self.facts, name="model-info", daemon=True).start()

    def _read(self) -> tuple[dict | None, str | None]:
        import json

        import mlflow
        from mlflow.exceptions import MlflowException

        where = f"{self.name}@{self.alias}"
        if self.tracking_uri.startswith("sqlite:///") and not Path(self.tracking_uri.removeprefix("sqlite:///")).is_file():
            # Opening a missing SQLite store would create an empty one (and take seconds).
            return None, f"there is no MLflow store at {self.tracking_uri}"
        try:
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            version = client.get_model_version_by_alias(self.name, self.alias)
            if version.version != self._described:  # once per version: what is served, whose
                log.info(
                    "the page describes %s version %s (run %s, by %s)",
                    self.name,
                    version.version,
                    version.run_id,
                    version_author(client, version),
                )
                self._described = version.version
            source = version.source or ""
            if source.startswith("models:/m-"):  # a logged model: the card sits among its artifacts
                location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
            else:  # an older runs:/ source: the card went to the run
                location = client.get_run(version.run_id).info.artifact_uri
            with tempfile.TemporaryDirectory() as folder:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{location.rstrip('/')}/{FACTS_FILE}", dst_path=folder, tracking_uri=self.tracking_uri
                )
                return json.loads(Path(path).read_text()), None
        except (MlflowException, OSError, ValueError) as error:
            log.info("no model card for %s in %s: %s", where, self.tracking_uri, str(error).splitlines()[0][:200])
            return None, f"the registry has no model card for {where}"

    def footer(self) -> dict:
        """What the page's footer shows: name always; version, source and accuracy once known.
        Never waits: it shows what was read last and asks for a fresh read if that is stale."""
        self.refresh_soon()
        facts = self._cached[1]
        if facts is None:
            return {"name": self.name, "version": None}
        return {
            "name": facts["model"].get("name") or self.name,
            "version": facts["model"].get("version"),
            "source": facts["data"]["source"],
            "synthetic": facts["data"].get("synthetic", False),
            "accuracy": facts["validation"]["accuracy"],
        }
