"""Seeds derived from several integers (seed, step, process, ...)."""
from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """Deterministically combine integers (seed, step, process, ...) into one 63-bit seed."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**64 - 1)
        value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return value >> 1
