"""Did a timed measurement get the CPU it asked for? Process CPU time against wall time x
torch threads over the measured span: a share well below 1 means other processes (or too many
threads) took the cores, and tokens/s measured then is not the machine's speed.

    from poelm.contention import CpuClock
    clock = CpuClock.start()
    ...                                   # the timed work
    clock.report(threads)                 # {"threads": 2, "cpu_share": 0.31, "contended": "contended: ..."}

Only meaningful on the CPU: a GPU run waits for its kernels without spending CPU time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CONTENDED_BELOW = 0.5  # a share of wall x threads below this is reported as contended


@dataclass(frozen=True)
class CpuClock:
    wall: float  # perf_counter at the start
    cpu: float  # process CPU time (every thread) at the start

    @classmethod
    def start(cls) -> "CpuClock":
        return cls(time.perf_counter(), time.process_time())

    def share(self, threads: int) -> float:
        """CPU time since the start / (wall time since the start x threads)."""
        wall = time.perf_counter() - self.wall
        return (time.process_time() - self.cpu) / (wall * max(threads, 1)) if wall > 0 else 1.0

    def report(self, threads: int) -> dict:
        """{"threads", "cpu_share", "contended": the note of `contention`, or None}."""
        share = self.share(threads)
        return {"threads": threads, "cpu_share": round(share, 3), "contended": contention(share)}


def contention(share: float) -> str | None:
    """The one-line note for a CPU share below CONTENDED_BELOW, else None."""
    if share >= CONTENDED_BELOW:
        return None
    return f"contended: CPU time {share:.2f} of wall x threads"
