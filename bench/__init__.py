"""The benchmarks, run from the repository root as modules (``python -m bench.engine``) so that the test
harness (``tests.support``) imports without path edits; ``make bench*`` does that."""
