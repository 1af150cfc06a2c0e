"""The CPU kernels in `csrc/` (decode and prefill attention, top-p choice, residual add + RMSNorm, rotary embedding and cache
write, SiLU-and-multiply), compiled on first use into one small library.

Built with the host's C++ compiler (`-march=native`, a plain C ABI loaded with ctypes: no torch headers, about a
second) into a per-user directory, named by a hash of everything the binary depends on (sources, flags, compiler,
CPU), written atomically, and checked against torch references each time a process loads it (each kernel's module
has its check). Where it cannot be built, the callers fall back to torch with one warning; a kernel that fails its
check is not served (the others are). Failures are remembered for the process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
# -fopenmp: the .so needs libgomp.so.1 by soname, which resolves to the copy torch has already loaded (one pool);
# --as-needed: no libstdc++ dependency (the kernels use none of it), so no runtime version mismatch either
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-exceptions",
         "-Wl,--as-needed")
MARCH_ENV = "ILF_LAB_KERNEL_MARCH"
BUILD_TIMEOUT_S = 180
# each kernel's C signature (the argtypes ctypes passes)
SIGNATURES = {
    "ilf_decode_attention": [ctypes.c_void_p] * 12 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int64],
    "ilf_prefill_attention": [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64],
    "ilf_add_rms_norm": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float],
    "ilf_rope_qkv": [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4,
    "ilf_silu_mul": [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3,
    "ilf_top_p": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_double,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64],
}


class KernelUnavailable(RuntimeError):
    """The kernels cannot run here: no compiler, a failed build, an unsupported platform, a failed check."""


def march() -> str:
    """The -march target: $ILF_LAB_KERNEL_MARCH where set (x86-64-v3: as an AVX2 host builds the kernels;
    results/sampling/session23.sh emulates a slow host with it), else native. Read when a process first loads the
    kernels. A measuring knob: stage keys do not see it (nor the host's instruction set), so use a fresh stage
    cache."""
    target = os.environ.get(MARCH_ENV) or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", target):
        raise KernelUnavailable(f"{MARCH_ENV}={target!r} is not a -march target (give the target alone: x86-64-v3)")
    return target


def flags() -> tuple[str, ...]:
    """FLAGS with march() in place of native."""
    return tuple(f"-march={march()}" if f == "-march=native" else f for f in FLAGS)


# the compiler's macros that name an instruction-set feature a -march target lets it use (x86 and Arm)
FEATURE_MACRO = re.compile(
    r"#define (__(?:AVX\w*|FMA\w*|F16C|BMI2?|LZCNT|MOVBE|POPCNT|SSE\w*|SSSE3|SHA\w*|AES|PCLMUL|GFNI|VAES|"
    r"VPCLMULQDQ|ADX|AMX\w*|ARM_FEATURE_\w+|ARM_NEON)__) "
)


def _features(cxx: str, march: str) -> set[str]:
    """The feature macros `-march=<march>` defines (native: what the compiler finds on this CPU)."""
    p = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                       text=True, timeout=30)
    if p.returncode != 0:
        raise KernelUnavailable(f"{MARCH_ENV}: {cxx} does not know -march={march}: {p.stderr.strip()[-300:]}")
    return set(FEATURE_MACRO.findall(p.stdout))


def _check_march(cxx: str, target: str) -> None:
    """A target that assumes a feature this CPU lacks would kill the process (SIGILL) when the library's check runs:
    refuse any target whose feature macros are not all among -march=native's."""
    if target == "native":
        return
    missing = sorted(_features(cxx, target) - _features(cxx, "native"))
    if missing:
        raise KernelUnavailable(f"{MARCH_ENV}: -march={target} assumes {', '.join(missing)}, which this CPU lacks")


def kernel_dir() -> Path:
    """Where builds are kept: $ILF_LAB_KERNEL_DIR, else the user's cache directory."""
    if d := os.environ.get("ILF_LAB_KERNEL_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ilf_lab" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError as e:  # -march=native: a build must never be served to another CPU
        raise KernelUnavailable(f"cannot identify this CPU for a -march=native build: {e}") from e
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))


def build_key(cxx: str) -> str:
    """A hash of what the binary depends on: every file in csrc/ (sources and headers), the flags, the compiler's
    version, the CPU and its features."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C++ compiler {cxx!r} did not run: {e}") from e
    files = [f"{p.name}\n{p.read_text()}" for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    blob = "\n".join([*files, " ".join(flags()), version, _cpu_identity(), platform.machine()])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def library_path(cxx: str) -> Path:
    return kernel_dir() / f"ilf_kernels-{build_key(cxx)}.so"


def _build(cxx: str, path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename: a reader never sees a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        _check_march(cxx, march())
        p = subprocess.run([cxx, *flags(), "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT_S)
        if p.returncode != 0:
            raise KernelUnavailable(f"{cxx} failed to build the kernels in {CSRC}: {p.stderr.strip()[-1500:]}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired as e:
        raise KernelUnavailable(f"{cxx} timed out ({e.timeout:.0f} s) building the kernels") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def kernel(name: str) -> Any:
    """The C function `name` of the library, built on first use and checked against torch before it is served."""
    why = kernel_error(name)
    if why is not None:
        raise KernelUnavailable(why)
    return getattr(_loaded()[0], name)


def kernel_error(name: str | None = None) -> str | None:
    """Why the kernels (with `name`: that kernel) cannot run here, or None when they can."""
    _, err, failed = _loaded()
    return err or (failed.get(name) if name else None)


@functools.cache
def _loaded() -> tuple[Any, str | None, dict[str, str]]:
    """(library, None, {kernel: why} for kernels that failed their check) or (None, why, {}): a failure is
    remembered too, so it is not retried per engine."""
    try:
        return _load()
    except KernelUnavailable as e:
        return None, str(e), {}
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:  # a read-only cache dir, ...
        return None, f"the CPU kernels could not be prepared ({type(e).__name__}: {e})", {}


def unbuildable() -> str | None:
    """Why the kernels cannot even be built here (platform, no compiler), or None; a build that fails or disagrees
    with torch is `kernel_error`'s (the tests skip on this one and fail on that one)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"the kernels are built for Linux on x86-64 or arm64, not {sys.platform} {platform.machine()}"
    if _compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def _load() -> tuple[Any, None, dict[str, str]]:
    if why := unbuildable():
        raise KernelUnavailable(why)
    cxx = _compiler()
    path = library_path(cxx)
    built = not path.exists()
    if built:
        _build(cxx, path)
    try:
        lib = _open(path)
    except KernelUnavailable:
        if built:
            raise
        path.unlink(missing_ok=True)  # a damaged file at the build's name: build it afresh, once
        _build(cxx, path)
        lib = _open(path)
    failed = {name: f"{path}: {name} {why}: not used" for name, why in _checks(lib).items() if why is not None}
    if failed:  # those kernels are not served to this process (the others are), and the file is not left for the next
        path.unlink(missing_ok=True)
        for why in failed.values():
            log.warning("%s", why)
    return lib, None, failed


def _checks(lib: Any) -> dict[str, str | None]:
    """Each kernel against its torch reference (None: agrees); the checks live beside the kernels' callers."""
    from ilf_lab.generation import attention, packed, sampling, slots

    return {"ilf_decode_attention": attention.check_kernel(lib.ilf_decode_attention),
            "ilf_prefill_attention": attention.check_prefill(lib.ilf_prefill_attention),
            "ilf_silu_mul": packed.check_silu_mul(lib.ilf_silu_mul),
            "ilf_top_p": sampling.check_kernel(lib.ilf_top_p),
            "ilf_add_rms_norm": slots.check_kernel(lib.ilf_add_rms_norm),
            "ilf_rope_qkv": slots.check_rope(lib.ilf_rope_qkv)}


def _open(path: Path) -> Any:
    # a file replaced on disk is not reloaded by dlopen while an older copy with the same name is loaded: each
    # build has its own name (the key), and a rebuilt damaged file never loaded in this process
    try:
        lib = ctypes.CDLL(str(path))
        for name, args in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
    except (OSError, AttributeError) as e:
        raise KernelUnavailable(f"{path} did not load: {e}") from e
    return lib
