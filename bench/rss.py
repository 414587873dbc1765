"""Resident memory of this process (now, and its peak during a block) and the glibc settings the benches run under.

:class:`PeakRSS` samples ``/proc/self/statm`` in a thread while the block runs, as
``bench/run.py`` does, and where the kernel allows it also resets the process's high-water
mark (``/proc/self/clear_refs``, ``VmHWM``) before the block and reads it after, which no
sampling interval can miss; the peak is the larger of the two. Linux only.
"""

from __future__ import annotations

import ctypes
import threading
import time

MB = 2 ** 20


def rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trim() -> None:
    """Hand memory glibc keeps on its free lists back to the OS (no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident bytes of the process while the block runs (``.peak``), and at its start (``.start``)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    def __enter__(self):
        self.start = self.peak = rss()
        self._kernel = _reset_high_water_mark()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(), _high_water_mark() if self._kernel else 0)


def parse_malloc_env(malloc_env: str) -> dict:
    """``"NAME=value ..."`` of glibc settings as a dict; a clear error for anything else."""
    settings = {}
    for item in malloc_env.split():
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("MALLOC_"):
            raise SystemExit(f"--malloc-env takes NAME=value glibc settings (MALLOC_...), got {item!r}")
        settings[name] = value
    return settings
