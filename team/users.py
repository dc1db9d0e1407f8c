"""`python -m team user add|remove|list`: the people of the tracking server, through MLflow's auth
REST API as its admin (the password in <home>/admin.password).

A person has one role, granted on the project's experiment and its registered model (both created
here if missing, so that the grants have something to name):

| role     | experiment `animal-faces` | registered model `animal`                  | catalogue |
|----------|---------------------------|--------------------------------------------|-----------|
| reader   | READ                      | READ                                       | reader    |
| trainer  | EDIT: log runs            | EDIT: register versions, tag them          | writer    |
| releaser | EDIT: log the gate's runs | MANAGE: move production (team.tracking_auth) | reader  |

Their password is generated, kept in <home>/users/<name>.password (0600), and handed over with their
environment in <home>/users/<name>.env (0600): it never goes on a command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import requests

from steps import defaults
from team.cluster import ADMIN, Layout, TeamError, exports, secret_file

# role -> (permission on the experiment, permission on the registered model, catalogue role)
ROLES = {
    "reader": ("READ", "READ", "reader"),
    "trainer": ("EDIT", "EDIT", "writer"),
    "releaser": ("EDIT", "MANAGE", "reader"),
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TIMEOUT = 30


@dataclass(frozen=True)
class User:
    name: str
    admin: bool
    role: str | None  # as recorded by `user add`; None for the admin or someone made elsewhere


def _call(layout: Layout, method: str, path: str, **kwargs) -> dict:
    """One request to the tracking server as its admin; a TeamError with the server's reason if it fails."""
    url = f"{layout.tracking_uri()}{path}"
    try:
        response = requests.request(method, url, auth=(ADMIN, layout.user_password(ADMIN)), timeout=TIMEOUT, **kwargs)
    except requests.RequestException as error:
        raise TeamError(f"the tracking server {layout.tracking_uri()} is unreachable ({error}): start it with `make team-up`") from None
    if response.status_code >= 400:
        reason = response.text.strip().splitlines()[0][:300] if response.text.strip() else f"HTTP {response.status_code}"
        raise TeamError(f"the tracking server refused {method} {path} (HTTP {response.status_code}): {reason}")
    return response.json() if response.content else {}


def _experiment_id(layout: Layout, name: str) -> str:
    try:
        found = _call(layout, "GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        return found["experiment"]["experiment_id"]
    except TeamError as error:
        if "RESOURCE_DOES_NOT_EXIST" not in str(error):
            raise
    return _call(layout, "POST", "/api/2.0/mlflow/experiments/create", json={"name": name})["experiment_id"]


def _ensure_model(layout: Layout, name: str) -> None:
    try:
        _call(layout, "GET", "/api/2.0/mlflow/registered-models/get", params={"name": name})
    except TeamError as error:
        if "RESOURCE_DOES_NOT_EXIST" not in str(error):
            raise
        _call(layout, "POST", "/api/2.0/mlflow/registered-models/create", json={"name": name})


def env_file(layout: Layout, name: str) -> Path:
    return layout.users_dir / f"{name}.env"


def add(layout: Layout, name: str, role: str, experiment: str = defaults.EXPERIMENT, model: str = defaults.MODEL_NAME) -> Path:
    """Create `name` with a generated password and `role`'s grants; the path of their environment file."""
    if role not in ROLES:
        raise TeamError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if not NAME.fullmatch(name) or name == ADMIN:
        raise TeamError(f"not a user name: {name!r} (letters, digits, _ . @ -; not {ADMIN!r})")
    experiment_permission, model_permission, catalogue_role = ROLES[role]
    experiment_id = _experiment_id(layout, experiment)
    _ensure_model(layout, model)
    layout.users_dir.mkdir(mode=0o700, exist_ok=True)  # their passwords: the admin's alone
    password_file = layout.user_password_file(name)
    if password_file.is_file():
        raise TeamError(f"{name} exists already ({password_file}): `python -m team user remove {name}` first")
    password = secret_file(password_file)
    try:
        _call(layout, "POST", "/api/2.0/mlflow/users/create", json={"username": name, "password": password})
        for resource_type, resource_id, permission in (
            ("experiment", experiment_id, experiment_permission),
            ("registered_model", model, model_permission),
        ):
            grant = {"username": name, "resource_type": resource_type, "resource_id": resource_id, "permission": permission}
            _call(layout, "POST", "/api/3.0/mlflow/users/permissions/grant", json=grant)
    except TeamError:
        password_file.unlink(missing_ok=True)
        raise
    target = env_file(layout, name)
    target.touch(mode=0o600)
    target.write_text(f"# {name}: {role} (python -m team user add)\n{exports(layout, catalogue_role, name)}")
    return target


def remove(layout: Layout, name: str) -> None:
    if name == ADMIN:
        raise TeamError(f"the admin user {ADMIN!r} stays: it is how `team` manages the others")
    _call(layout, "DELETE", "/api/2.0/mlflow/users/delete", json={"username": name})
    layout.user_password_file(name).unlink(missing_ok=True)
    env_file(layout, name).unlink(missing_ok=True)


def listed(layout: Layout) -> list[User]:
    users = _call(layout, "GET", "/api/2.0/mlflow/users/list")["users"]
    return [User(u["username"], bool(u["is_admin"]), _recorded_role(layout, u["username"])) for u in users]


def _recorded_role(layout: Layout, name: str) -> str | None:
    target = env_file(layout, name)
    if name == ADMIN or not target.is_file():
        return None
    first = target.read_text().splitlines()[0]
    return first.split(": ", 1)[1].split(" ", 1)[0] if ": " in first else None
