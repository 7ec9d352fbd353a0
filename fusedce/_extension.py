"""Loading of the compiled extension fusedce._C, with a clear error when it cannot work.

A C++ extension of PyTorch only runs against the torch it was compiled with (the C++ ABI of libtorch
changes between releases), so before the shared object is loaded its build-time torch version
(fusedce/_build_meta.py, written by setup.py) is compared with the running one.
"""

from __future__ import annotations

import importlib
import platform
from types import ModuleType
from typing import Any

import torch  # first: loads libtorch (and its OpenMP runtime) that fusedce._C links against

from . import _torch_fixes

_REBUILD_HINT = (
    "rebuild fusedce against the installed torch: from a clone, "
    "`pip install --no-build-isolation -e .` (or `pip install --no-build-isolation --no-deps "
    "--force-reinstall .`)"
)

_module: ModuleType | None = None


def _release(version: str) -> tuple[int, int, int]:
    """major.minor.micro of a torch version; the local part (+cpu, +cu130) is ignored."""
    from packaging.version import InvalidVersion, Version

    try:
        rel = Version(version).release
    except InvalidVersion:
        return (-1, -1, -1)
    return tuple((list(rel) + [0, 0, 0])[:3])  # type: ignore[return-value]


def _build_meta() -> ModuleType | None:
    try:
        return importlib.import_module("fusedce._build_meta")
    except ImportError:  # a source tree that was never built (or a CMake-only build)
        return None


def _check_torch_version(meta: ModuleType | None) -> None:
    built = getattr(meta, "TORCH_VERSION", None)
    if not built:
        return
    running = torch.__version__
    if _release(built) != _release(running):
        raise ImportError(
            f"fusedce was built against torch {built} but torch {running} is installed; "
            f"{_REBUILD_HINT}."
        )


def load_extension() -> ModuleType:
    """Import fusedce._C (registering the torch.ops.fusedce.* ops) and return the module.

    Raises ImportError with a rebuild hint when the running torch is not the one fusedce was built
    against, or when the shared object cannot be loaded (not built, undefined symbol, ...).
    """
    global _module
    if _module is not None:
        return _module
    meta = _build_meta()
    _check_torch_version(meta)
    try:
        mod = importlib.import_module("fusedce._C")
    except ImportError as e:
        built = getattr(meta, "TORCH_VERSION", None)
        against = f"built against torch {built}, " if built else ""
        raise ImportError(
            f"fusedce: cannot load the compiled extension fusedce._C ({against}torch "
            f"{torch.__version__} is installed): {e}\n{_REBUILD_HINT}."
        ) from e
    _module = mod
    return mod


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def build_info() -> dict[str, Any]:
    """How fusedce._C was built (CPU/CUDA, CUDA version, archs, torch it was built against) merged
    with what is running now (torch version, whether CUDA is usable, the device name)."""
    info: dict[str, Any] = dict(load_extension().build_info())
    meta = _build_meta()
    if meta is not None:
        info["built_with_torch"] = getattr(meta, "TORCH_VERSION", None)
    info["torch_runtime_version"] = torch.__version__
    info["torch_runtime_cuda"] = torch.version.cuda
    cuda_available = torch.cuda.is_available()
    info["cuda_available"] = cuda_available
    if cuda_available:
        idx = torch.cuda.current_device()
        info["device"] = torch.cuda.get_device_name(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        info["device_capability"] = f"sm_{major}{minor}"
    else:
        info["device"] = _cpu_name()
    info["num_threads"] = torch.get_num_threads()
    # Whether import fusedce replaced torch's quadratic custom-op fill_defaults (the host cost of
    # every call depends on it; fusedce/_torch_fixes.py).
    info["torch_fill_defaults_fix"] = _torch_fixes.installed
    return info
