"""Fixed glibc malloc settings for benchmarks that compare whole generations.

With glibc's default dynamic mmap threshold, freed memory goes back to the kernel and is faulted in again,
and how often depends on the heap's history: the same 30-step SD 2-base generation at 256 px measured
5.5 million minor page faults in one run and 15 million in the next (141 s vs 160 s), traced or not. That
noise is larger than the costs the benchmarks measure. A fixed mmap threshold (32 MB), no trimming and a
256 MB top pad keep freed memory in the process, so both arms of a comparison run under the same,
stable allocator (and generation is faster). Pass ``--default-malloc`` to measure with glibc's defaults.
"""

from __future__ import annotations

import os
import sys

TUNED = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # fixed: disables the dynamic threshold
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),  # never give the heap top back to the kernel
    "MALLOC_TOP_PAD_": str(256 * 2**20),  # grow the heap in large steps
}


def use_tuned_malloc() -> dict[str, str]:
    """Re-execute this script with :data:`TUNED` in the environment (glibc reads it at start-up) unless
    ``--default-malloc`` is on the command line; returns the settings in effect, for the results file."""
    if "--default-malloc" in sys.argv:
        sys.argv.remove("--default-malloc")
        return {}
    if any(os.environ.get(k) != v for k, v in TUNED.items()):
        os.environ.update(TUNED)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return dict(TUNED)
