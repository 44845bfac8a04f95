"""The training methods `skipcache tune --method` can run, one module each, all in one harness.

    skip-tuning   Skip Tuning: LSkip at the store's omega + CSkip (the default)     skip_tuning.py
    ft            full fine-tuning in this harness (store at omega 0, no CSkip)      skip_tuning.py
    ft-lskip      FT + LSkip, the paper's Table 4 ablation (omega > 0, no CSkip)     skip_tuning.py
    ft-cskip      FT + CSkip, the paper's Table 4 ablation (omega 0, CSkip)          skip_tuning.py
    fast          preset: omega = N - N//4 (9 of 12), CSkip r = 0.25                 skip_tuning.py
    coop          CoOp: learned prompt context, frozen CLIP                          coop.py
    clip-adapter  CLIP-Adapter: residual MLP on the frozen image feature             clip_adapter.py
    lora          LoRA on the deep blocks' projections of both towers                lora.py
    paper-schedule  the authors' schedule: no persistent cache, 77-token prompts,    paper_schedule.py
                  their CSkip (store at omega 0)
    ft-conventional FT as the paper ran it: every block every step, 77-token         paper_schedule.py
                  prompts, every class (store at omega 0)

All of them read the same store, prompts and batches, train with the same placement, precision,
optimiser (`skipcache.step.make_optimizer`), schedule and loop (`skipcache.stages.tune`), and
write the same run directory; `skipcache.baselines.base` says what a method provides.
"""

from __future__ import annotations

from skipcache.baselines.base import Head, Method
from skipcache.baselines.clip_adapter import CLIPAdapter
from skipcache.baselines.coop import CoOp
from skipcache.baselines.lora import LoRA
from skipcache.baselines.paper_schedule import FTConventional, PaperSchedule
from skipcache.baselines.skip_tuning import FT, FTCSkip, FTLSkip, Fast, SkipTuning, family_name, fast_omega
from skipcache.errors import ConfigError

DEFAULT_METHOD = SkipTuning.name
METHODS: dict[str, Method] = {m.name: m for m in (SkipTuning(), FT(), FTLSkip(), FTCSkip(), Fast(), CoOp(), CLIPAdapter(), LoRA(),
                                                    PaperSchedule(), FTConventional())}

__all__ = ["DEFAULT_METHOD", "METHODS", "Head", "Method", "family_name", "fast_omega", "get_method"]


def get_method(name: str) -> Method:
    """The method called `name`; ConfigError listing the known ones otherwise."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return method
