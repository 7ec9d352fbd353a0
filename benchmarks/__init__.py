"""fusedce's benchmark suite: `python -m benchmarks <command> [args]` (benchmarks/__main__.py lists
the commands; `python -m benchmarks --help`), on a GPU machine unless a command says otherwise."""
