"""What the deployment CPU can run correctly (KERNELS.md, MODELS.md).

On x86 without VNNI, ONNX Runtime's u8 x s8 integer kernels add pairs of products in 16 bits with
saturation (VPMADDUBSW): 255 * 127 * 2 overflows, so full-range INT8 weights give wrong results.
Two fixes are exact everywhere: 7-bit INT8 weights (|q| <= 63), or the same 8-bit symmetric grid
stored as UINT8 around 128, which sends ONNX Runtime to its u8 x u8 kernels (no saturation). The
second keeps a bit of precision, so it is the default. The compiler cannot know the user's CPU, so
the default is what is right on every CPU; the report says which choice was made.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import UsageError


@dataclass(frozen=True)
class CpuProfile:
    choice: str
    weight_dtype: str  # "int8" or "uint8"
    weight_qmax: int
    reason: str


def has_vnni(cpuinfo: str | None = None) -> bool:
    """True if this x86 CPU has AVX-512 VNNI or AVX-VNNI; True on non-x86 CPUs (no such saturation)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_profile(choice: str) -> CpuProfile:
    if choice == "native":
        choice = "vnni" if has_vnni() else "avx2"
        detected = f" (detected on this machine: {choice})"
    else:
        detected = ""
    if choice == "vnni":
        return CpuProfile("vnni", "int8", 127, "INT8 weights, u8 x s8 kernels: exact with VNNI, wrong on AVX2-only x86"
                          + detected)
    if choice in ("any", "avx2"):
        return CpuProfile(choice, "uint8", 127, "8-bit weights stored as UINT8 around 128: u8 x u8 kernels, exact on "
                          "every x86 CPU" + detected)
    if choice == "7bit":
        return CpuProfile(choice, "int8", 63, "7-bit INT8 weights: u8 x s8 kernels exact on every x86 CPU")
    raise UsageError(f"option cpu: expected any, vnni, avx2, 7bit or native, got {choice!r}")
