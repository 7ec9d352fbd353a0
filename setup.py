"""Build of fusedce._C with torch.utils.cpp_extension.

    pip install --no-build-isolation .        # or -e . ; python -m build --wheel --no-isolation

CUDA build (CUDAExtension, nvcc) when the installed torch has CUDA and nvcc is found (CUDA_HOME),
otherwise a CPU-only CppExtension. Environment:
    FUSEDCE_FORCE_CPU=1     force the CPU-only build
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default DEFAULT_CUDA_ARCHS, "8.0;9.0a;10.0;12.0+PTX":
                            SASS for sm_80 (A100, and 8.x GPUs), sm_90a (H100/H200), sm_100 (B200/
                            GB200 and B300, 10.x) and sm_120 (RTX 50 / RTX PRO, 12.x), plus compute_120
                            PTX that the driver JIT-compiles on a newer GPU; with nvcc < 12.8, which
                            knows no Blackwell, "8.0;9.0a")
    MAX_JOBS                parallel compile jobs (ninja)
The build needs torch at build time, so install with --no-build-isolation: an isolated build would
fetch a different torch than the one the extension will run against.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only reached without torch
    sys.exit(
        "fusedce: building needs torch installed first, and pip's --no-build-isolation so that the "
        "build sees it: pip install torch && pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
# sm_100, not sm_100a: an arch-specific ("a") cubin runs on that exact compute capability only,
# so sm_100a would leave B300 (10.3) without a kernel, and no kernel here uses an arch-specific
# instruction (sm_90a keeps its "a": 9.0 is the only 9.x). PTX for the newest target: a GPU newer
# than every SASS target JIT-compiles it instead of failing with "no kernel image".
DEFAULT_CUDA_ARCHS = "8.0;9.0a;10.0;12.0+PTX"
# nvcc before 12.8 knows no Blackwell target.
DEFAULT_CUDA_ARCHS_PRE_BLACKWELL = "8.0;9.0a"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _sources(*patterns: str) -> list[str]:
    """Sorted relative paths (setuptools wants sources relative to setup.py); empty globs are fine."""
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(pattern, root_dir=HERE))
    return found


def _want_cuda() -> tuple[bool, str]:
    if _env_flag("FUSEDCE_FORCE_CPU"):
        return False, "FUSEDCE_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={cpp_extension.CUDA_HOME}"


def _nvcc_version():
    """The release of $CUDA_HOME/bin/nvcc (packaging Version), else torch's CUDA version."""
    import re
    import subprocess

    from packaging.version import Version

    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"release (\d+\.\d+)", out)
        if match:
            return Version(match.group(1))
    except (OSError, subprocess.CalledProcessError):
        pass
    return Version(torch.version.cuda or "0")


def _default_cuda_archs() -> str:
    from packaging.version import Version

    if _nvcc_version() < Version("12.8"):
        return DEFAULT_CUDA_ARCHS_PRE_BLACKWELL
    return DEFAULT_CUDA_ARCHS


def _use_ninja() -> bool:
    return cpp_extension.is_ninja_available()


def _warn_static_libstdcxx() -> None:
    """Warn when $CXX may link libstdc++ statically into the extension.

    torch.utils.cpp_extension compiles and links with $CXX. On one GPU image it was a wrapper
    script (/opt/gcc/bin/g++) that linked a private static libstdc++ into _C.so; iostreams inside
    _C.so and inside libtorch then disagreed, and every TORCH_CHECK message that formats a number
    crashed the process. The system g++ (CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++
    -shared") links it dynamically, as libtorch does.
    """
    cxx = os.environ.get("CXX", "").split()
    if not cxx:
        return
    try:
        with open(cxx[0], "rb") as f:
            is_script = f.read(2) == b"#!"
    except OSError:
        return
    if is_script:
        print(
            f"fusedce: warning: CXX={cxx[0]} is a wrapper script; if it links libstdc++ statically "
            "the extension will crash on its first error message. Prefer the system compiler: "
            'CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared".',
            file=sys.stderr,
        )


_warn_static_libstdcxx()
WITH_CUDA, WHY = _want_cuda()
USE_NINJA = _use_ninja()

if WITH_CUDA:
    # torch.utils.cpp_extension reads TORCH_CUDA_ARCH_LIST itself; when it is not set it would build
    # for the GPUs visible now (none on a build machine), so set our default explicitly.
    CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or _default_cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS
else:
    CUDA_ARCHS = ""


def _write_build_meta() -> None:
    cuda_version = torch.version.cuda if WITH_CUDA else None
    text = (
        "# Written by setup.py at build time; do not edit (git-ignored).\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA = {WITH_CUDA!r}\n"
        f"CUDA_VERSION = {cuda_version!r}\n"
        f"CUDA_ARCHS = {CUDA_ARCHS!r}\n"
    )
    path = os.path.join(HERE, "fusedce", "_build_meta.py")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def _extension():
    sources = _sources("csrc/fusedce.cpp", "csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = []
    if WITH_CUDA:
        sources += _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp", "csrc/cuda/kernels/*.cu")
        define_macros.append(("FUSEDCE_WITH_CUDA", None))
        # A string literal for csrc/fusedce.cpp's build_info(). Only the C++ compiler gets it (nvcc
        # would split a -D value at commas). No shell quoting here: cpp_extension shlex-quotes every
        # flag it writes into build.ninja, and the plain setuptools compiler passes argv directly.
        cxx_flags.append(f'-DFUSEDCE_CUDA_ARCHS="{CUDA_ARCHS}"')
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                      "-Xcompiler", "-fopenmp"]
        return cpp_extension.CUDAExtension(
            name="fusedce._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        name="fusedce._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


print(
    f"fusedce: {'CUDA' if WITH_CUDA else 'CPU-only'} build ({WHY})"
    + (f", archs {CUDA_ARCHS}" if WITH_CUDA else "")
    + f", ninja {'on' if USE_NINJA else 'off'}, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}",
    file=sys.stderr,
)
_write_build_meta()

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=USE_NINJA)},
)
