"""`python -m team up|down|status|upgrade|user|env`: the team layout on this machine (make team-up / team-down).

upgrade: after installing a newer MLflow, stop the tracking server, `mlflow db upgrade` its database,
start it again (back up first: docs/team.md).
user add NAME --role reader|trainer|releaser, user remove NAME, user list: the tracking server's people.
env [--user NAME] [--role writer|reader]: the exports for NAME (default: the admin) with the catalogue's
writer or reader role.

`up` keeps the host and ports it used in <home>/settings.json; every later action (status, down,
upgrade, up again, user, env) uses them unless told otherwise on its command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steps import defaults
from team import users
from team.cluster import ADMIN, Layout, TeamError, down, exports, postgres_running, tracking_server_answers, up, upgrade


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m team", description=__doc__)
    parser.add_argument("action", choices=("up", "down", "status", "upgrade", "user", "env"))
    parser.add_argument("words", nargs="*", metavar="add|remove|list [NAME]", help="for user")
    parser.add_argument("--role", default=None, help="user add: reader, trainer or releaser; env: writer or reader")
    parser.add_argument("--user", default=ADMIN, help="env: whose tracking login")
    parser.add_argument("--home", type=Path, default=defaults.TEAM_DIR, help="the cluster's data, artifacts and logs")
    # None: what the last `up` used (<home>/settings.json), else the default.
    parser.add_argument(
        "--host", default=None, help=f"where PostgreSQL and the tracking server listen ({defaults.TEAM_HOST}; 0.0.0.0: other machines too)"
    )
    parser.add_argument("--postgres-port", type=int, default=None, help=f"default {defaults.TEAM_POSTGRES_PORT}")
    parser.add_argument("--port", type=int, default=None, help=f"the tracking server's (default {defaults.TEAM_TRACKING_PORT})")
    parser.add_argument(
        "--artifacts", default=None, help="where the server keeps artifacts: a folder (default <home>/artifacts) or s3://bucket/prefix"
    )
    parser.add_argument(
        "--allowed-hosts", default=None, help="Host headers accepted beyond localhost and private IPs, e.g. mlflow.example.com"
    )
    parser.add_argument("--workers", type=int, default=defaults.TEAM_WORKERS)
    return parser


SETTINGS = "settings.json"  # in the team folder: where the last `up` listened


def layout_from(args: argparse.Namespace) -> Layout:
    """The command line's host and ports, else the team folder's settings, else the defaults."""
    try:
        saved = json.loads((args.home / SETTINGS).read_text())
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    host = args.host or saved.get("host") or defaults.TEAM_HOST
    postgres_port = args.postgres_port or saved.get("postgres_port") or defaults.TEAM_POSTGRES_PORT
    return Layout(args.home, host, int(postgres_port), int(args.port or saved.get("tracking_port") or defaults.TEAM_TRACKING_PORT))


def save_settings(layout: Layout) -> None:
    settings = {"host": layout.host, "postgres_port": layout.postgres_port, "tracking_port": layout.tracking_port}
    (layout.home / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = layout_from(args)
    try:
        if args.action == "up":
            first = not layout.user_password_file(ADMIN).is_file()
            up(layout, args.artifacts, args.allowed_hosts, args.workers)
            save_settings(layout)
            env_file = layout.home / "team.env"
            env_file.touch(mode=0o600)  # it holds the admin's and the catalogue writer's passwords
            env_file.write_text(exports(layout))
            print(
                f"team: PostgreSQL on {layout.client_host()}:{layout.postgres_port}, "
                f"tracking server on {layout.tracking_uri()} (login required)\n"
                f"use it as {ADMIN}: source {env_file}"
            )
            if first:  # shown this once; afterwards it is only in the 0600 file
                password, kept = layout.user_password(ADMIN), layout.user_password_file(ADMIN)
                print(f"the tracking server's admin is {ADMIN!r}, password {password} (kept in {kept})")
        elif args.action == "user":
            return user_command(layout, args.words, args.role)
        elif args.action == "env":
            print(exports(layout, args.role or "writer", args.user), end="")
        elif args.action == "upgrade":
            upgrade(layout, args.artifacts, args.allowed_hosts, args.workers)
            print(f"team: tracking database migrated, server back on {layout.tracking_uri()}")
        elif args.action == "down":
            down(layout)
            print("team: stopped")
        else:
            print(
                f"PostgreSQL: {'running' if postgres_running(layout) else 'stopped'} (port {layout.postgres_port}); tracking server "
                f"{layout.tracking_uri()}: {'answers' if tracking_server_answers(layout.tracking_uri()) else 'down'}"
            )
    except TeamError as error:
        print(f"team: error: {error}", file=sys.stderr)
        return 2
    return 0


def user_command(layout: Layout, words: list[str], role: str | None) -> int:
    if words[:1] == ["add"] and len(words) == 2 and role:
        target = users.add(layout, words[1], role)
        print(f"team: {words[1]} added as {role}; their environment (with their password) is {target}, 0600: hand it over privately")
    elif words[:1] == ["remove"] and len(words) == 2:
        users.remove(layout, words[1])
        print(f"team: {words[1]} removed")
    elif words == ["list"]:
        for user in users.listed(layout):
            print(f"{user.name}\t{'admin' if user.admin else user.role or '?'}")
    else:
        raise TeamError("usage: python -m team user add NAME --role reader|trainer|releaser | user remove NAME | user list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
