"""csrc/chunk_budget.h, the chunk sizes both backends derive from their memory budgets, against its
specification in Python (fusedce/_budget.py's chunk_rows, which memory_budget plans with, and the
vocabulary tile written out here). The CUDA tuning lives in these numbers (rows per chunk for each
shape), so a change to the helper that moves a chunk size fails here, not only in a benchmark."""

import itertools
import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from fusedce._budget import chunk_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

DRIVER = r"""
#include "chunk_budget.h"
#include <cstdio>
int main() {
  long long n, cs, budget, per_row, bal, v, vcs;
  while (std::scanf("%lld %lld %lld %lld %lld %lld %lld", &n, &cs, &budget, &per_row, &bal, &v,
                    &vcs) == 7) {
    std::printf("%lld %lld\n", (long long)fusedce::chunk_rows(n, cs, budget, per_row, bal != 0),
                (long long)fusedce::vocab_tile(v, vcs));
  }
  return 0;
}
"""


def spec_rows(n, chunk_size, budget, per_row, balance):
    """The rows of a chunk: chunk_size when given, else fusedce._budget.chunk_rows, the Python
    statement of the budget rule (memory_budget plans with it), so that one written-out rule
    pins the header and the Python planner alike."""
    if chunk_size > 0:
        return min(chunk_size, max(n, 1))
    return chunk_rows(n, budget, per_row, balance)


def spec_tile(v, vcs):
    return min(vcs, v) if vcs > 0 else v


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("chunk_budget")
    src, exe = d / "driver.cpp", d / "driver"
    src.write_text(DRIVER)
    incs = [f"-I{p}" for p in cpp_extension.include_paths()[:1]]
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{os.path.join(ROOT, 'csrc')}", *incs, "-o",
                    str(exe), str(src)], check=True)
    return str(exe)


def run(driver, cases):
    text = "".join(" ".join(str(x) for x in c) + "\n" for c in cases)
    out = subprocess.run([driver], input=text, capture_output=True, text=True, check=True).stdout
    return [tuple(int(x) for x in line.split()) for line in out.splitlines()]


def test_matches_spec(driver):
    cases = list(itertools.product(
        [0, 1, 63, 64, 65, 4095, 4097, 8192, 16385, 100003, 1 << 20],  # n
        [0, 1, 3, 64, 5000],                                            # chunk_size
        [0, 7, 64 * MiB, 1024 * MiB],                                   # budget
        [2, 4096, 256512, 2 * 256000 + 4 * 8192, 1 << 30],              # bytes per row
        [0, 1],                                                         # balance
        [1, 50257, 128256],                                             # vocab
        [0, 1, 8192, 1 << 20],                                          # vocab_chunk_size
    ))
    # the 64-row rounding exactly at the budget: 128 rows fit, 200 rows split as 100 + 100 -> 128
    cases.append((200, 0, 128 * 1000, 1000, 1, 1, 0))
    got = run(driver, cases)
    assert got[-1] == (128, 1)
    want = [(spec_rows(n, cs, b, pr, bal), spec_tile(v, vcs)) for n, cs, b, pr, bal, v, vcs in cases]
    assert got == want


def test_cuda_default_shapes(driver):
    # fast mode, bf16, the default 1 GiB budget: a 128256-wide row is 256512 bytes, 4185 rows fit,
    # so 8192 rows take two balanced chunks of 4096 (a multiple of 64); 10000 rows take three of
    # 3334, rounded up to 3392
    got = run(driver, [(8192, 0, 1024 * MiB, 2 * 128256, 1, 128256, 0),
                       (10000, 0, 1024 * MiB, 2 * 128256, 1, 128256, 0),
                       (10000, 0, 1024 * MiB, 2 * 128256, 0, 128256, 0)])
    assert got == [(4096, 128256), (3392, 128256), (4185, 128256)]
