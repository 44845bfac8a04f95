"""Test-session settings shared by every test module.

One intra-op thread, here and in every process the tests start (`skipcache` subprocesses,
the pipeline's spawned tuning children inherit OMP_NUM_THREADS). The models under test are tiny:
a second thread buys nothing, and on a busy 2-core machine OpenMP threads waiting on each other
made the same tuning run 10-20x slower and its timing erratic. Set OMP_NUM_THREADS to override.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
