"""promote: make an existing version of `animal` Production again (stage and alias): a rollback.

    mlflow run . -e promote --env-manager local -P version=3 [-P force=true]

The version is scored on the catalogue's current validation split together with the current
Production version, and promoted only if it is at least as good, unless force=true. Either way
the versions involved record what replaced what, when and why (steps/register.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from databases import catalogue
from steps import defaults
from steps.register import promote
from steps.tracking import start_run
from team.preflight import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", required=True, help="the version number to make Production")
    parser.add_argument("--force", type=defaults.boolean, default=False, help="true: promote even if it scores lower")
    parser.add_argument("--db", type=catalogue.location, default=defaults.CATALOGUE, help="its validation split is the test")
    parser.add_argument("--name", default=defaults.MODEL_NAME)
    return parser


@one_line_errors("promote")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with start_run("promote"):  # the evaluations nest in it
            result = promote(args.version, args.db, args.force, args.name)
    except (LookupError, FileNotFoundError, ValueError) as error:
        print(f"promote: error: {error}", file=sys.stderr)
        return 2
    print(f"promote: {args.name} version {result.version}: {result.reason}")
    return 0 if result.promoted else 1


if __name__ == "__main__":
    sys.exit(main())
