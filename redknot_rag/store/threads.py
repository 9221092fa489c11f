"""Reader threads that decode with one intra-op thread each.

The store's cold reads run in a pool of threads (`ChunkKVStore.get_blocks_many`), and each decodes its
chunk with torch tensor ops. By default every such op fans out over torch's whole OpenMP pool, so 8
readers on a 16-core host run 8 x 16 threads and contend; measured on the H200 host: 64 int8 chunks
decoded in 2.1 s that way against 0.8 s with one intra-op thread per reader.

`torch.set_num_threads` would change the process-wide default; OpenMP's thread count is a per-thread
setting, so a reader sets its own: it first runs one parallel-sized op (torch applies its default to a
thread on that thread's first parallel op, which would otherwise undo the setting), then calls the
OpenMP runtime's `omp_set_num_threads(1)`. Other threads keep their pools. Where torch's own OpenMP
runtime cannot be found (another torch build), this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re

import torch

log = logging.getLogger(__name__)


@functools.cache
def _omp_set_num_threads() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """`omp_set_num_threads` of the OpenMP runtime torch itself loaded (GNU or Intel), or None. Other
    packages may load their own copy of the runtime (faiss, scikit-learn); only torch's counts, so only a
    runtime inside torch's package (`torch/lib`, or the wheel's `torch.libs`) is used."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return None
    root = os.path.dirname(os.path.realpath(torch.__file__))  # .../site-packages/torch
    mine = (root + os.sep, root + ".libs" + os.sep)
    for path in sorted(set(re.findall(r"(/\S*lib(?:gomp|iomp5)\S*\.so\S*)", maps))):
        if not os.path.realpath(path).startswith(mine):
            continue
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def one_intra_op_thread() -> None:
    """Give the calling thread one intra-op thread for its torch CPU ops (a thread pool initializer)."""
    fn = _omp_set_num_threads()
    if fn is None:
        return
    torch.zeros(1 << 16).add_(1)  # this thread's first parallel-sized op: torch's per-thread setup runs now
    fn(1)
