"""The compiling process's peak resident memory, for the report."""
from __future__ import annotations

import resource
import sys


def reset_peak() -> bool:
    """Start measuring the peak from now (Linux: writing 5 to /proc/self/clear_refs resets VmHWM).
    False where it cannot be reset: the peak is then the process's since it started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """The peak resident memory (file pages mapped included) since `reset_peak`, or since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux kilobytes
