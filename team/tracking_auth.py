"""The tracking server's login: MLflow's basic auth plus the one rule its permissions cannot say.

A registered model is code (the `animal` pyfunc is loaded with cloudpickle), so whoever points
`production` at a version runs their Python on every machine that serves or scores. MLflow 3.17.2's
basic-auth (mlflow/server/auth/__init__.py, BEFORE_REQUEST_HANDLERS) lets EDIT on a registered model
do that: SetRegisteredModelAlias needs `can_update` on the model, TransitionModelVersionStage
`can_update` on the version tier (falling back to the model), RenameRegisteredModel `can_update`
(rename `animal` away, rename one's own model to `animal`). EDIT is also what registering a version
and tagging it need, so a trainer who may register could promote. This module is the server's
`authorization_function` (basic_auth.ini): it authenticates exactly as basic-auth does and, on those
routes only, also requires MANAGE on the model.

Likewise, with workspaces off MLflow lets every logged-in user create experiments and registered
models (`_can_create_in_workspace`: "Always allows when workspaces are disabled"), and the creator
gets MANAGE on what they made: a reader could log runs after all, in an experiment of their own.
Here creating either is for the admin (`team user add` creates `animal-faces` and `animal`).
Everything else is MLflow's own decision.
"""

from __future__ import annotations

import functools
import json

from flask import Response, g, request

MANAGE, ADMIN = "manage", "admin"


@functools.cache
def guarded_routes() -> dict[tuple[str, str], str]:
    """(path, method) -> MANAGE for every route that moves what `models:/<name>@production` or
    `models:/<name>/Production` resolves to, ADMIN for the creating ones: REST and the UI's ajax
    paths alike."""
    from mlflow.protos.model_registry_pb2 import (
        CreateRegisteredModel,
        DeleteRegisteredModelAlias,
        RenameRegisteredModel,
        SetRegisteredModelAlias,
        TransitionModelVersionStage,
    )
    from mlflow.protos.service_pb2 import CreateExperiment
    from mlflow.server.handlers import get_endpoints

    rules = {
        SetRegisteredModelAlias: MANAGE,
        DeleteRegisteredModelAlias: MANAGE,
        TransitionModelVersionStage: MANAGE,
        RenameRegisteredModel: MANAGE,
        CreateRegisteredModel: ADMIN,
        CreateExperiment: ADMIN,
    }
    endpoints = get_endpoints(lambda request_class: request_class if request_class in rules else None)
    return {(path, method): rules[handler] for path, handler, methods in endpoints if handler in rules for method in methods}


def authenticate():
    """basic-auth's authentication; on a guarded route, a 403 unless the user is an admin or (on a
    production-moving one) holds MANAGE on the registered model."""
    from mlflow.server import auth

    result = auth.authenticate_request_basic_auth()
    rule = guarded_routes().get((request.path, request.method))
    if isinstance(result, Response) or rule is None:
        return result
    # MLflow's permission lookup calls the authorization function again: answer that call (and the
    # validators' later ones) with the authentication alone, the rule is decided once per request.
    if getattr(g, "animal_rule", None) is not None:
        return result if g.animal_rule != "denied" else g.animal_denial
    g.animal_rule = "checking"
    allowed = auth.store.get_user(result.username).is_admin
    if rule == MANAGE:
        name = auth._get_request_param("name")
        allowed = allowed or auth._get_permission_from_registered_model_or_prompt_name().can_manage
        message = f"moving production (alias, stage or name) of registered model '{name}' needs MANAGE on it"
    else:
        message = "creating experiments and registered models is for the admin (python -m team user add makes the project's)"
    g.animal_rule, g.animal_denial = ("allowed", None) if allowed else ("denied", forbidden(message))
    return result if allowed else g.animal_denial


def forbidden(message: str) -> Response:
    # The shape MLflow's REST errors have, so the client raises it as an MlflowException with this message.
    body = {"error_code": "PERMISSION_DENIED", "message": message}
    return Response(json.dumps(body), status=403, mimetype="application/json")
