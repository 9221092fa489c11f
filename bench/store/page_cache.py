"""Cold reads for the store benchmarks: the chunk files' pages dropped from the OS page cache (the machine's
other cached pages are left alone; no root needed)."""

from __future__ import annotations

import os
from pathlib import Path


def drop_page_cache(root: Path) -> int:
    """posix_fadvise(DONTNEED) on every chunk file (`*.rkv`) under `root` (clean pages: the store fsyncs on
    commit, so the kernel can drop them); returns the number of files."""
    n = 0
    for path in root.rglob("*.rkv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        n += 1
    return n
