"""fastft's benchmark harness, run from a checkout: ``python -m bench.kernels``, ``python -m bench.train``,
``python -m bench.compare``. Results are JSON under bench/results/ (see bench.common)."""
