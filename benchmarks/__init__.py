"""fusedce's benchmark suite (run with `python -m benchmarks RESULTS_DIR` on a GPU machine)."""
