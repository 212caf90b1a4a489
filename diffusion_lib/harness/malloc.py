"""glibc malloc tuning for CPU training."""
from __future__ import annotations


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep what is freed (Linux, CPU training).

    By default glibc maps every block above its mmap threshold afresh and unmaps it when freed, so each
    training step page-faults its big activations back in: at rank 20, batch 2048 that cost 6 % of a lone
    run's step and half the throughput of a pack of 10 on a 2-core CPU (benchmarks/results.md). The
    process then keeps its peak heap until it exits. Returns whether the settings took (False where the
    C library is not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
