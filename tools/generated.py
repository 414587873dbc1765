"""Generated files: write them, or (``--check``) say which are out of date.

Used by the generators in this folder (tools/gen_docs.py), whose output is committed and checked by the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path


def write_or_check(files: Mapping[Path, Callable[[], str]], check: bool, command: str) -> int:
    """Make each file's text; write it, or with ``check`` compare it. Returns the exit code."""
    stale = []
    for path, make in files.items():
        text = make()
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run {command}):", ", ".join(stale))
        return 1
    return 0
