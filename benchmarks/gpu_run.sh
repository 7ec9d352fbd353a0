#!/usr/bin/env bash
# Build fusedce with CUDA, run the GPU tests, run the floor benchmark; results into one folder.
#
#   benchmarks/gpu_run.sh RESULTS_DIR [floor options, e.g. --quick --sweep]
#
# Environment: FUSEDCE_GPU_TESTS (pytest targets, default tests/test_cuda_ops.py; "none" skips),
# FUSEDCE_GPU_BENCH=0 skips the benchmark. Exit status: non-zero if the build or a test failed.
set -o pipefail
OUT_DIR=${1:?usage: benchmarks/gpu_run.sh RESULTS_DIR [floor options (python -m benchmarks floor --help)]}
shift
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used \
  --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
  | tee -a "$OUT_DIR/gpu.txt"

# The GPU image's CC/CXX are wrapper scripts that link libstdc++ statically into _C.so (which then
# crashes on the first error message it formats, see setup.py): build with the system compiler.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi

start=$(date +%s)
if ! MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT_DIR/build.log" 2>&1; then
  echo "pip install -e . failed; trying setup.py build_ext --inplace" | tee -a "$OUT_DIR/build.log"
  if ! MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace >>"$OUT_DIR/build.log" 2>&1; then
    tail -40 "$OUT_DIR/build.log"
    exit 1
  fi
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c 'import fusedce; print(fusedce.build_info())' 2>&1 | tail -2

TESTS=${FUSEDCE_GPU_TESTS:-tests/test_cuda_ops.py}
if [ "$TESTS" != "none" ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086
  python3 -m pytest -q -rf -p no:cacheprovider $TESTS 2>&1 | tee "$OUT_DIR/tests.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "tests: $(( $(date +%s) - start )) s"
fi

if [ "${FUSEDCE_GPU_BENCH:-1}" != "0" ]; then
  python3 -m benchmarks floor --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
