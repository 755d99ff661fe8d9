"""Triton's file cache, counting its lookups: ``TRITON_CACHE_MANAGER=`` this module's
``CountingCacheManager`` (``module:Class``, read by Triton at each lookup).

Triton calls ``get_group`` once per kernel it compiles in a process (a kernel already loaded
in the process never gets there): a group found is a disk-cache hit, none a miss (the kernel
is compiled and stored). Each lookup appends ``hit <entry>/<name>`` or ``miss ...`` to the
file named by ``$DEPTHPRO_FAST_TRITON_CACHE_LOG`` (no variable: nothing is written);
``python -m depthpro_fast.bench.triton_cache count LOG`` adds them up. Writing the log never
fails a lookup. The cache itself is Triton's ``FileCacheManager``, unchanged.
"""

from __future__ import annotations

import os

from triton.runtime.cache import FileCacheManager

LOG_ENV = "DEPTHPRO_FAST_TRITON_CACHE_LOG"


class CountingCacheManager(FileCacheManager):
    """``FileCacheManager`` that logs each group lookup as a hit or a miss."""

    def get_group(self, filename: str) -> dict[str, str] | None:
        group = super().get_group(filename)
        log = os.environ.get(LOG_ENV)
        if log:
            try:  # O_APPEND lines: processes of one run write to the same file
                with open(log, "a") as f:
                    f.write(f"{'hit' if group else 'miss'} {self.key}/{filename}\n")
            except OSError:
                pass
        return group
