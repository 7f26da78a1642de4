"""Progress bars and phase timings of a run: bars on stderr only when it is a terminal (or when
asked), each phase's wall time kept for the report."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """Progress bars (``show``: None = only when stderr is a terminal) and phase timings."""

    def __init__(self, show: bool | None = None):
        self.show = sys.stderr.isatty() if show is None else show
        self.seconds: dict[str, float] = {}

    def bar(self, items: Iterable[T], desc: str, unit: str = "group", total: int | None = None) -> Iterable[T]:
        """``items``, with a bar that disappears when done."""
        if not self.show:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (repeated phases add up)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


QUIET = Progress(False)
