"""bench/load.py runs (against the session's scoring server, so no second one is started) and loses
no request. Its timings and memory figures are measured, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, VENV_PATH


def test_load_script_runs_with_zero_errors(pipeline, scoring_server, tmp_path):
    figures = tmp_path / "load.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.load",
            "--requests",
            "120",
            "--warmup",
            "16",
            "--concurrency",
            "16",
            "--page-workers",
            "1",
            "--scoring-url",
            scoring_server,
            "--db",
            str(pipeline.db),
            "--max-growth",
            "1000",
            "--json",
            str(figures),
        ],
        cwd=ROOT,
        env={**os.environ, "PATH": VENV_PATH},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(figures.read_text())
    assert summary["requests"] == 120 and summary["errors"] == 0
    assert set(summary["routes"]) == {"page /api/predict", "page /predict", "page /images/<id>", "scoring /invocations", "all"}
    assert all(route["requests"] == 30 for name, route in summary["routes"].items() if name != "all")
    assert "page (gunicorn)" in summary["memory_mb"]
    for heading in ("req/s", "p50 ms", "p95 ms", "p99 ms", "VmRSS"):
        assert heading in result.stdout
