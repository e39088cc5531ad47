"""Progress bars (tqdm on stderr; ``ERPD_PROGRESS=0`` turns them off)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

def progress(iterable=None, **kw):
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    kw.setdefault("disable", os.environ.get("ERPD_PROGRESS", "1") == "0")
    return tqdm(iterable, **kw)


def say(msg: str) -> None:
    """One line on stderr, between the progress bars."""
    tqdm.write(msg, file=sys.stderr)
