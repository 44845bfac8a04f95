"""Speed and memory benchmark of Skip Tuning's stages: `python -m skipcache.bench` (`make benchmark`).

Speed and memory are measured here, never in the tests. See `skipcache.bench.steps` for what each
configuration runs and `docs/benchmark.md` for the method and measured numbers.
"""

from skipcache.bench.steps import CONFIGS, TRAIN_CONFIGS, BenchOptions, run_config, run_in_child

__all__ = ["CONFIGS", "TRAIN_CONFIGS", "BenchOptions", "run_config", "run_in_child"]
