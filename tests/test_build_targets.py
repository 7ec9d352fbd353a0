"""The GPU targets are one list: setup.py's DEFAULT_CUDA_ARCHS (as torch.utils.cpp_extension turns
it into nvcc flags), the architectures CI compiles every kernel for (.ci/run), and the CMake default.
A target added in one place only would ship kernels CI never compiled, or a CMake library for
other GPUs than the wheel."""

import ast
import os
import re

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _setup_constant(name):
    for node in ast.parse(_read("setup.py")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def _pairs_from_gencode(flags):
    """{(arch, code)} from -gencode arch=X,code=Y / -gencode=arch=X,code=Y flags."""
    text = " ".join(flags)
    return set(re.findall(r"arch=(compute_\w+),code=(\w+)", text))


def _setup_pairs(arch_list, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    return _pairs_from_gencode(cpp_extension._get_cuda_arch_flags())


def test_default_targets_cover_ampere_hopper_blackwell_with_ptx(monkeypatch):
    pairs = _setup_pairs(_setup_constant("DEFAULT_CUDA_ARCHS"), monkeypatch)
    sass = {code for _, code in pairs if code.startswith("sm_")}
    ptx = {code for _, code in pairs if code.startswith("compute_")}
    assert sass == {"sm_80", "sm_90a", "sm_100", "sm_120"}
    assert ptx == {"compute_120"}  # the newest target, for GPUs newer than all of them


def test_ci_compiles_every_default_target(monkeypatch):
    ci = _read(".ci/run")
    m = re.search(r"GENCODE=\((.*?)\)", ci, re.S)
    assert m, ".ci/run has no GENCODE=(...) array"
    ci_pairs = _pairs_from_gencode(m.group(1).split())
    assert ci_pairs == _setup_pairs(_setup_constant("DEFAULT_CUDA_ARCHS"), monkeypatch)


@pytest.mark.parametrize("which", ["new", "pre_blackwell"])
def test_cmake_default_matches_setup(which, monkeypatch):
    cmake = _read("CMakeLists.txt")
    found = re.findall(r'set\(CMAKE_CUDA_ARCHITECTURES "([^"]+)"\)', cmake)
    assert len(found) == 2, found  # nvcc < 12.8, and the full list
    cm = found[1] if which == "new" else found[0]
    const = "DEFAULT_CUDA_ARCHS" if which == "new" else "DEFAULT_CUDA_ARCHS_PRE_BLACKWELL"
    pairs = set()
    for entry in cm.split(";"):
        num, _, kind = entry.partition("-")
        if kind in ("", "real"):
            pairs.add((f"compute_{num}", f"sm_{num}"))
        if kind in ("", "virtual"):
            pairs.add((f"compute_{num}", f"compute_{num}"))
    assert pairs == _setup_pairs(_setup_constant(const), monkeypatch)


def _op_names(text, call):
    return re.findall(rf'm\.{call}\(\s*"(\w+)', text)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_every_op_has_one_kernel_per_backend(backend):
    """The schemas live in csrc/fusedce.cpp only; each backend's files (split by concern) register
    every op exactly once, so a file left out of the build, or an op registered twice, shows here
    rather than only when the library loads on that backend."""
    import glob

    ops = _op_names(_read("csrc/fusedce.cpp"), "def")
    assert ops, "csrc/fusedce.cpp defines no op"
    impls = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", backend, "*.cpp"))):
        text = _read(os.path.relpath(path, ROOT))
        assert not _op_names(text, "def"), f"{path} defines a schema"
        impls += _op_names(text, "impl")
    assert sorted(impls) == sorted(ops)
