"""The compiling process's peak resident memory, for the report."""
from __future__ import annotations

import ctypes
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


def return_freed_memory() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).

    NumPy temporaries between 128 kB and 32 MB come from the C heap, and glibc keeps them after they are
    freed, fragmented: after GPTQ's rounding of a 241M-parameter model, 200 MB of it (of 844 MB resident)
    stayed resident, where the next ONNX Runtime session could not reuse it for its weights."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
