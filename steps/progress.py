"""Progress of a long step: a tqdm bar on a terminal, plain periodic lines everywhere else.

At AFHQ's scale extract and populate take minutes. In a terminal a bar shows it; in a log (`mlflow
run`, CI, a file) a bar would be thousands of carriage returns or nothing at all, so there the step
prints one line at every tenth of the way instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
UNKNOWN_TOTAL_EVERY = 1000  # items between lines when the total is not known


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "img", stream: IO[str] | None = None) -> Iterator[T]:
    """Yield `items`, showing how far along they are on `stream` (default: standard error)."""
    stream = stream or sys.stderr
    if _is_terminal(stream):
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream)
        return
    yield from _lines(items, total, desc, unit, stream)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def _lines(items: Iterable[T], total: int | None, desc: str, unit: str, stream: IO[str]) -> Iterator[T]:
    every = max(1, -(-total // 10)) if total else UNKNOWN_TOTAL_EVERY
    started = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        if done % every == 0 and done != total:
            _line(stream, desc, done, total, unit, time.monotonic() - started)
    _line(stream, desc, done, total, unit, time.monotonic() - started)


def _line(stream: IO[str], desc: str, done: int, total: int | None, unit: str, seconds: float) -> None:
    share = f" ({100 * done / total:.0f}%)" if total else ""
    rate = f", {done / seconds:,.0f} {unit}/s" if seconds > 0 else ""
    of = f"/{total:,}" if total else ""
    print(f"{desc}: {done:,}{of} {unit}{share}, {seconds:.1f} s{rate}", file=stream, flush=True)
