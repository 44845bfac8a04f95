"""Benchmarks (measured here, never asserted in the tests):

- `python -m skipcache.bench` (`skipcache bench`, `make benchmark`): every training method of
  `skipcache.baselines` on one workload, a report laid out like the paper's Tables 4 and 5
  (`methods.py` measures, `report.py` writes the markdown and plots);
- `python -m skipcache.bench.components`: the tune step against conventional FT, cache-stage and
  store throughput (`steps.py`);
- `python -m skipcache.bench.tune_stage`: whole `skipcache tune` processes;
- `python -m skipcache.bench.gpu_check`: `make gpu-check`'s report.

See `docs/benchmark.md` for the method and the measured numbers.
"""

from skipcache.bench.steps import CONFIGS, TRAIN_CONFIGS, BenchOptions, run_config, run_in_child

__all__ = ["CONFIGS", "TRAIN_CONFIGS", "BenchOptions", "run_config", "run_in_child"]
