"""Tune-stage pieces: the schedule, class-grouped batches, and a run with them on a tiny store."""

import json
import math

import pytest
import torch

from skipcache.errors import ConfigError
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.tune import TuneConfig, _lr_at, class_batches, run_tune
from skipcache.store import FeatureStore


def test_schedule_is_constant_warmup_then_cosine_to_zero():
    cfg = TuneConfig(epochs=4, warmup_epochs=1, warmup_lr=1e-6)
    steps = 10
    assert all(_lr_at(s, cfg, steps, 2e-5) == 1e-6 for s in range(steps))
    assert _lr_at(steps, cfg, steps, 2e-5) == pytest.approx(2e-5)
    middle = steps + 15  # half of the 30 cosine steps
    assert _lr_at(middle, cfg, steps, 2e-5) == pytest.approx(1e-5)
    assert _lr_at(4 * steps, cfg, steps, 2e-5) == pytest.approx(0.0, abs=1e-12)


def test_class_batches_cover_every_row_once_and_hold_one_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    split = {"vision": torch.arange(2 * 10 * 3 * 2, dtype=torch.float16).view(2, 10, 3, 2), "labels": labels,
             "zeroshot_rank": torch.zeros(10, 3, dtype=torch.long)}
    batches = list(class_batches(split, 2, view=1, seed=0))
    rows = torch.cat([b["index"] for b in batches])
    assert sorted(rows.tolist()) == list(range(10))
    for b in batches:
        assert len(torch.unique(b["labels"])) == 1 and len(b["labels"]) <= 2
        assert torch.equal(b["vision"], split["vision"][1, b["index"]].float())
    assert len(batches) == math.ceil(3 / 2) + 1 + math.ceil(5 / 2)
    again = [b["index"].tolist() for b in class_batches(split, 2, view=1, seed=0)]
    assert again == [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("kwargs, message", [
    ({"batching": "nope"}, "batching must be 'shuffle' or 'class'"),
    ({"rank": "nope"}, "rank must be 'zeroshot' or 'dynamic'"),
    ({"r": 0.0}, "r must be in (0, 1]"),
    ({"lam": -1.0}, "lam must be > 0"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"rank": "dynamic", "cskip_variant": "paper-code", "cskip_subset": "image"}, "per-image paper-code masks"),
])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**kwargs).validate()
    assert message in str(info.value)


@pytest.mark.parametrize("rank, variant", [("zeroshot", "eq7"), ("dynamic", "eq7"), ("zeroshot", "paper-code")])
def test_class_batching_shrinks_the_text_union_of_per_image_subsets(tmp_path, rank, variant):
    cached = run_cache(CacheConfig(dataset="synthetic", dataset_options={"num_classes": 20}, model="tiny",
                                   pretrained="none", omega=3, shots=8, root=tmp_path / "store", device="cpu", progress=False))
    unions = {}
    for batching in ("shuffle", "class"):
        run_tune(TuneConfig(store=cached.path, out=tmp_path / f"{batching}-{rank}-{variant}", epochs=1, batch_size=8,
                            batching=batching, rank=rank, cskip_variant=variant, cskip_subset="image", r=0.2, lam=1.0, warmup_epochs=0,
                            device="cpu", progress=False))
        rows = [json.loads(l) for l in (tmp_path / f"{batching}-{rank}-{variant}" / "metrics.jsonl").read_text().splitlines()]
        unions[batching] = rows[-1]["text_classes_per_step"]
    # 10 base classes: each image keeps its true class and ~2 top-ranked ones; 8 mixed images cover most classes
    assert unions["class"] < unions["shuffle"]


def test_evaluate_stores_loads_once_and_matches_run_eval(tmp_path):
    from skipcache.stages.evaluate import evaluate_stores, run_eval

    cached = run_cache(CacheConfig(dataset="synthetic", dataset_options={"num_classes": 6}, model="tiny", pretrained="none",
                                   omega=3, shots=4, root=tmp_path / "store", device="cpu", progress=False))
    run = run_tune(TuneConfig(store=cached.path, out=tmp_path / "run", epochs=1, batch_size=4, warmup_epochs=0,
                              device="cpu", progress=False))
    own, same_as_target = evaluate_stores(run.run_dir, [None, cached.path], device="cpu")
    assert own.accuracy == same_as_target.accuracy == run_eval(run.run_dir, device="cpu").accuracy
    assert (run.run_dir / f"eval-synthetic-{FeatureStore.open(cached.path).key_hash}.json").exists()
