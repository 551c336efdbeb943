"""Files that readers see whole or not at all, even when several runs write the same one at once."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replace_when_written(path: Path) -> Iterator[Path]:
    """
    Yields a new file name beside `path` (same suffix) to write, then renames that file over `path`. A run killed
    while writing leaves no truncated `path`, and two runs writing `path` at once each rename their own file (the last
    one wins) instead of one renaming the other's away. The file is removed if the writing fails.
    """
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
