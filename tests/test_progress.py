"""steps.progress: a bar on a terminal, plain periodic lines in logs."""

from __future__ import annotations

import io

from steps.progress import UNKNOWN_TOTAL_EVERY, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gets_a_line_per_tenth_and_a_last_one():
    stream = io.StringIO()
    assert list(progress(range(95), 95, "populate", unit="row", stream=stream)) == list(range(95))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and all(line.startswith("populate: ") for line in lines)
    assert lines[0].startswith("populate: 10/95 row (11%)") and lines[-1].startswith("populate: 95/95 row (100%)")


def test_unknown_total_counts_without_a_share():
    stream = io.StringIO()
    list(progress(iter(range(UNKNOWN_TOTAL_EVERY + 5)), None, "extract", stream=stream))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "%" not in stream.getvalue()
    assert lines[-1].startswith(f"extract: {UNKNOWN_TOTAL_EVERY + 5:,} img")


def test_a_terminal_gets_a_bar():
    stream = Terminal()
    assert list(progress(range(50), 50, "extract", stream=stream)) == list(range(50))
    assert "\r" in stream.getvalue() and "50/50" in stream.getvalue()


def test_empty_input_still_says_so():
    stream = io.StringIO()
    assert list(progress([], 0, "extract", stream=stream)) == []
    assert stream.getvalue().startswith("extract: 0 img")
