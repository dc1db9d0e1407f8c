"""The team layout: PostgreSQL + `mlflow server` started on this machine (docs/team.md)."""
