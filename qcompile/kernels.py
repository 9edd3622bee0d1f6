"""qcompile's ONNX Runtime custom-op library (domain ``ai.qcompile``): build it, find it, check it.

The sources ship with qcompile (`custom_kernels/`, CMake); `build` compiles them into the cache dir, under a
digest of the sources, so a changed source is a library not yet built. They need ONNX Runtime's C API headers,
which no PyPI wheel ships: `build` takes them from ``$QCOMPILE_ORT_INCLUDE`` (a folder holding
``onnxruntime_c_api.h``, version 1.20 or newer) or else downloads the pinned npm package that carries the
official ones (about 150 MB, once; its checksum is verified) and keeps only the headers and their licence.

The library links no ONNX Runtime: built once, it loads into every ONNX Runtime from `OLDEST_RUNTIME` on.
`qcompile.session` registers it whenever it is built, so a model that uses its ops runs like any other.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import UsageError
from qcompile.paths import cache_dir

DOMAIN = "ai.qcompile"
# metadata_props key of a model that needs the library; its value names the domain and ops
METADATA_KEY = "qcompile.custom_ops"
OLDEST_RUNTIME = (1, 20)
LIBRARY_NAME = "libqcompile_kernels.so"
INCLUDE_ENV = "QCOMPILE_ORT_INCLUDE"
# ONNX Runtime 1.29's headers (ORT_API_VERSION 29), MIT licence, inside a Unity package on npm.
HEADERS_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
HEADERS_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
HEADERS_IN_PACKAGE = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
LICENSE_IN_PACKAGE = "package/LICENSE"
# Instruction sets the CPU kernels have a path for, fastest first; QCOMPILE_KERNELS_ISA picks a slower one.
ISA_ENV = "QCOMPILE_KERNELS_ISA"
ISAS = ("avx512vnni", "avx2", "portable")
_ISA_FLAGS = {"avx512vnni": {"avx512_vnni", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"}, "avx2": {"avx2", "fma"},
              "portable": set()}


def sources() -> Path:
    """The folder holding CMakeLists.txt and src/ (installed with qcompile as `qcompile.custom_kernels`)."""
    import qcompile.custom_kernels

    return Path(qcompile.custom_kernels.__file__).parent


@functools.cache
def source_digest() -> str:
    digest = hashlib.sha256()
    root = sources()
    for path in sorted([root / "CMakeLists.txt", *(root / "src").iterdir()]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """Where the library of these sources is, once built."""
    return cache_dir() / "kernels" / source_digest() / LIBRARY_NAME


def runtime_supported() -> bool:
    from qcompile.runtime import onnxruntime, runtime_version

    return runtime_version(onnxruntime()) >= OLDEST_RUNTIME


def built_library() -> Path | None:
    """The library, where it is built and this ONNX Runtime can load it."""
    path = library_path()
    return path if path.is_file() and runtime_supported() else None


def require_library() -> Path:
    """The library, or a usage error that says how to get it."""
    if not runtime_supported():
        from qcompile.runtime import onnxruntime

        raise UsageError(f"qcompile's custom-op library ({DOMAIN}) needs ONNX Runtime "
                         f"{'.'.join(map(str, OLDEST_RUNTIME))} or newer; this is {onnxruntime().__version__}")
    path = library_path()
    if not path.is_file():
        raise UsageError(f"qcompile's custom-op library ({DOMAIN}) is not built: run `qcompile kernels build` "
                         f"(needs cmake and a C++ compiler)")
    return path


def _headers() -> Path:
    """A folder holding onnxruntime_c_api.h: ``$QCOMPILE_ORT_INCLUDE``, or the npm package's, downloaded once."""
    if given := os.environ.get(INCLUDE_ENV):
        if not (Path(given) / "onnxruntime_c_api.h").is_file():
            raise UsageError(f"{INCLUDE_ENV}={given}: no onnxruntime_c_api.h there")
        return Path(given)
    folder = cache_dir() / "ort-headers" / HEADERS_PACKAGE.replace("@", "-")
    if (folder / "onnxruntime_c_api.h").is_file():
        return folder
    by_hand = (f"or download ONNX Runtime's headers (1.20 or newer) yourself and set {INCLUDE_ENV} to the folder "
               f"holding onnxruntime_c_api.h")
    npm = shutil.which("npm")
    if npm is None:
        raise UsageError(f"npm is not installed, and ONNX Runtime's C API headers come from the npm package "
                         f"{HEADERS_PACKAGE}: install npm, {by_hand}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        done = subprocess.run([npm, "pack", HEADERS_PACKAGE, "--silent"], cwd=work, capture_output=True, text=True)
        tarballs = list(Path(work).glob("*.tgz"))
        if done.returncode or len(tarballs) != 1:
            raise UsageError(f"downloading ONNX Runtime's headers (npm package {HEADERS_PACKAGE}) failed: "
                             f"{_last_line(done.stderr)}; {by_hand}")
        if _sha256(tarballs[0]) != HEADERS_SHA256:
            raise UsageError(f"npm package {HEADERS_PACKAGE} does not have the expected checksum; {by_hand}")
        unpacked = Path(work) / "headers"
        unpacked.mkdir()
        with tarfile.open(tarballs[0]) as archive:
            for member in archive.getmembers():
                wanted = member.name.startswith(HEADERS_IN_PACKAGE) or member.name == LICENSE_IN_PACKAGE
                if member.isfile() and wanted:
                    (unpacked / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        os.replace(unpacked, folder)
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def build(force: bool = False) -> Path:
    """Build the library for these sources (unless built), and return its path."""
    target = library_path()
    if target.is_file() and not force:
        return target
    cmake = shutil.which("cmake")
    if cmake is None:
        raise UsageError("building qcompile's custom-op library needs cmake (and a C++ compiler): install them, "
                         "e.g. apt install cmake g++")
    include = _headers()
    build_dir = target.parent / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [[cmake, "-S", str(sources()), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
              f"-DORT_INCLUDE_DIR={include}"],
             [cmake, "--build", str(build_dir), "--parallel"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            errors = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
            raise UsageError(f"building qcompile's custom-op library failed: "
                             f"{errors[0] if errors else _last_line(done.stderr or done.stdout)}")
    partial = target.with_suffix(".partial")
    shutil.copyfile(build_dir / LIBRARY_NAME, partial)
    os.replace(partial, target)
    return target


def cpu_isas(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The kernels' instruction-set paths this CPU runs, fastest first."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = set(next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split())
    return tuple(isa for isa in ISAS if _ISA_FLAGS[isa] <= flags)


# BlockQuantMatMul (K, N, bits, block_size, symmetric, rows): odd sizes, short last blocks, both kernel paths
# (1 row, several); with a code book and 8-bit scales (NF4's form: K, N, block_size, scale_block, rows);
# OutlierSplitMatMul (K, N, rows, fixed outlier columns or None: detected at run time).
CHECK_CASES = ((100, 13, 4, 32, True, 1), (576, 37, 4, 128, False, 5), (300, 21, 8, 64, False, 3),
               (1000, 19, 4, 64, True, 7), (96, 9, 8, 32, True, 1), (520, 11, 4, 256, False, 2))
CODE_BOOK_CHECK_CASES = ((576, 37, 64, 256, 1), (200, 40, 32, 5, 4))
OUTLIER_CHECK_CASES = ((100, 13, 1, None), (576, 37, 6, None), (300, 21, 3, (0, 7, 299)))


@dataclass(frozen=True)
class CheckResult:
    case: str
    isa: str
    max_error: float  # relative to the largest |Y|
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def check(seed: int = 0) -> list[CheckResult]:
    """Run the library's ops against their numpy references (`qcompile.ops`) on random data, on every
    instruction-set path this CPU has."""
    import numpy as np

    from qcompile.ops import block_quant_matmul, outlier_split_matmul
    from qcompile.runtime import onnxruntime

    ort = onnxruntime()
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(require_library()))
    rng = np.random.default_rng(seed)
    cases = []  # (description, model, input, expected output)
    for k, n, bits, block_size, symmetric, rows in CHECK_CASES:
        attributes = dict(K=k, N=n, bits=bits, block_size=block_size)
        weight = block_quant_matmul.random_weight(rng, symmetric=symmetric, **attributes)
        a = rng.standard_normal((2, rows, k)).astype(np.float32)
        description = (f"BlockQuantMatMul K={k} N={n} {bits}-bit block {block_size} "
                       f"{'symmetric' if symmetric else 'zero points'}")
        cases.append((description, block_quant_matmul.make_model(*weight, **attributes), a,
                      block_quant_matmul.reference(a, *weight, **attributes)))
    for k, n, block_size, scale_block, rows in CODE_BOOK_CHECK_CASES:
        attributes = dict(K=k, N=n, bits=4, block_size=block_size)
        weight = block_quant_matmul.random_weight(rng, symmetric=True, code_book=True, scale_block=scale_block,
                                                  **attributes)
        a = rng.standard_normal((2, rows, k)).astype(np.float32)
        cases.append((f"BlockQuantMatMul K={k} N={n} code book, block {block_size}, 8-bit scales per {scale_block}",
                      block_quant_matmul.make_model(*weight, **attributes), a,
                      block_quant_matmul.reference(a, *weight, **attributes)))
    for k, n, rows, columns in OUTLIER_CHECK_CASES:
        weight = outlier_split_matmul.random_weight(rng, K=k, N=n)
        a = rng.standard_normal((2, rows, k)).astype(np.float32)
        a[..., k // 3] *= 30  # an outlier feature
        cases.append((f"OutlierSplitMatMul K={k} N={n} {'fixed' if columns else 'detected'} outliers",
                      outlier_split_matmul.make_model(*weight, columns, K=k, N=n), a,
                      outlier_split_matmul.reference(a, *weight, columns, K=k, N=n)))
    results = []
    for description, model, a, expected in cases:
        serialized = model.SerializeToString()
        for isa in cpu_isas():
            with _isa(isa):
                session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
                got = session.run(None, {"A": a})[0]
            error = float(np.abs(got - expected).max() / np.abs(expected).max())
            results.append(CheckResult(description, isa, error, 1e-5))
    return results


@contextlib.contextmanager
def _isa(isa: str):
    """Sessions opened inside use the kernels' ``isa`` path (the library reads the variable per session)."""
    before = os.environ.get(ISA_ENV)
    os.environ[ISA_ENV] = isa
    try:
        yield
    finally:
        if before is None:
            del os.environ[ISA_ENV]
        else:
            os.environ[ISA_ENV] = before
