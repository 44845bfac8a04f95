"""Tune-stage pieces: the schedule, class-grouped batches, and a run with them on a tiny store."""

import json
import math
import sys

import pytest
import torch

from skipcache.errors import ConfigError, StoreError
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.tune import TuneConfig, _lr_at, class_batches, run_tune
from skipcache.store import FeatureStore


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """4 classes, 2 of them base, 4 shots: 8 training rows, 2 steps of 4 per epoch."""
    return run_cache(CacheConfig(dataset="synthetic", dataset_options={"num_classes": 4, "test_per_class": 4},
                                 model="tiny", pretrained="none", omega=2, shots=4, device="cpu", progress=False,
                                 root=tmp_path_factory.mktemp("small_store"))).path


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wrap_load_model(monkeypatch, wrap) -> None:
    """Replace `skipcache.loading.load_model` by `wrap(original)` in every skipcache module that
    holds it (its own module, and any that imported the name)."""
    from skipcache import loading

    original = loading.load_model
    wrapped = wrap(original)
    for name, module in list(sys.modules.items()):
        if name.startswith("skipcache") and getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", wrapped)


def count_model_loads(monkeypatch) -> list:
    """The model names `load_model` is called with from now on."""
    calls = []

    def wrap(original):
        def counting(*args, **kwargs):
            calls.append(args[0] if args else kwargs["name"])
            return original(*args, **kwargs)
        return counting

    wrap_load_model(monkeypatch, wrap)
    return calls


def test_schedule_is_constant_warmup_then_cosine_to_zero():
    cfg = TuneConfig(epochs=4, warmup_epochs=1, warmup_lr=1e-6)
    steps = 10
    assert all(_lr_at(s, cfg, steps, 2e-5) == 1e-6 for s in range(steps))
    assert _lr_at(steps, cfg, steps, 2e-5) == pytest.approx(2e-5)
    middle = steps + 15  # half of the 30 cosine steps
    assert _lr_at(middle, cfg, steps, 2e-5) == pytest.approx(1e-5)
    assert _lr_at(4 * steps, cfg, steps, 2e-5) == pytest.approx(0.0, abs=1e-12)


def test_default_warmup_is_one_epoch_but_none_in_a_one_epoch_run():
    steps = 10
    # 1 epoch, warm-up unset: cosine from the first step (2e-5), half-way at step 5 (1e-5)
    one = TuneConfig(epochs=1)
    assert [_lr_at(s, one, steps, 2e-5) for s in (0, 5)] == pytest.approx([2e-5, 1e-5])
    # 3 epochs, warm-up unset: the paper's one epoch at 1e-6, then cosine over the 20 steps left
    three = TuneConfig(epochs=3)
    assert [_lr_at(s, three, steps, 2e-5) for s in (0, 9, 10, 20)] == pytest.approx([1e-6, 1e-6, 2e-5, 1e-5])
    # set explicitly, it is used as given
    assert _lr_at(0, TuneConfig(epochs=1, warmup_epochs=0), steps, 2e-5) == pytest.approx(2e-5)
    assert _lr_at(10, TuneConfig(epochs=3, warmup_epochs=2), steps, 2e-5) == 1e-6


def test_a_one_epoch_run_trains_at_the_full_rate_and_records_the_resolved_warmup(tmp_path, small_store):
    one = run_tune(TuneConfig(store=small_store, out=tmp_path / "one", epochs=1, device="cpu", progress=False))
    two = run_tune(TuneConfig(store=small_store, out=tmp_path / "two", epochs=2, device="cpu", progress=False))
    assert json.loads((one.run_dir / "config.json").read_text())["warmup_epochs"] == 0
    assert json.loads((two.run_dir / "config.json").read_text())["warmup_epochs"] == 1
    # lr_text is the rate of an epoch's last step. 2 steps per epoch, lr 2e-5:
    # 1 epoch, no warm-up: step 1 of 2 on the cosine, 0.5 * 2e-5 * (1 + cos(pi / 2)) = 1e-5 (not 1e-6)
    assert [m["lr_text"] for m in _metrics(one.run_dir)] == pytest.approx([1e-5])
    # 2 epochs: the warm-up epoch at 1e-6, then step 1 of the 2 cosine steps
    assert [m["lr_text"] for m in _metrics(two.run_dir)] == pytest.approx([1e-6, 1e-5])


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
    ({"cskip": {"r": 0.0}}, "cskip.r must be in (0, 1]"),
    ({"cskip": {"lam": -1.0}}, "cskip.lam must be > 0"),
    ({"cskip": {"rr": 0.3}}, "cskip has no setting rr"),
    ({"cskip": "no"}, "cskip must be true, false or a table"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"rank": "dynamic", "cskip": {"variant": "paper-code", "subset": "image"}}, "per-image paper-code masks"),
    ({"epochs": 1, "warmup_epochs": 1}, "warmup_epochs 1 with epochs 1: the warm-up would take the whole run"),
    ({"epochs": 3, "warmup_epochs": 3}, "warmup epochs must be in [0, epochs), got 3 for 3 epochs"),
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
                            batching=batching, rank=rank, cskip={"variant": variant, "subset": "image", "r": 0.2, "lam": 1.0}, warmup_epochs=0,
                            device="cpu", progress=False))
        rows = [json.loads(l) for l in (tmp_path / f"{batching}-{rank}-{variant}" / "metrics.jsonl").read_text().splitlines()]
        unions[batching] = rows[-1]["text_classes_per_step"]
    # 10 base classes: each image keeps its true class and ~2 top-ranked ones; 8 mixed images cover most classes
    assert unions["class"] < unions["shuffle"]


def test_evaluate_stores_loads_once_and_matches_run_eval(tmp_path, monkeypatch, small_store):
    from skipcache.stages.evaluate import evaluate_stores, run_eval

    run = run_tune(TuneConfig(store=small_store, out=tmp_path / "run", epochs=1, batch_size=4, warmup_epochs=0,
                              device="cpu", progress=False))
    loads = count_model_loads(monkeypatch)
    own, same_as_target, again = evaluate_stores(run.run_dir, [None, small_store, small_store], device="cpu")
    assert loads == ["tiny"]  # one model for three evaluations
    assert own.accuracy == same_as_target.accuracy == again.accuracy == run_eval(run.run_dir, device="cpu").accuracy
    assert len(loads) == 2  # run_eval loads its own
    assert (run.run_dir / f"eval-synthetic-{FeatureStore.open(small_store).key_hash}.json").exists()


def test_tune_refuses_weights_whose_hash_is_not_the_stores(tmp_path, monkeypatch, small_store):
    """The store was cached from the tiny model's random init with seed 1; weights from seed 2
    (another file under the same name, in real life) must not be trained on its tokens."""
    wrap_load_model(monkeypatch, lambda real: lambda name, source="none", *, seed=0: real(name, source, seed=seed + 1))
    assert FeatureStore.open(small_store).key["weights_hash"] == "random-seed1"
    out = tmp_path / "run"
    with pytest.raises(StoreError) as info:
        run_tune(TuneConfig(store=small_store, out=out, epochs=1, device="cpu", progress=False))
    assert "(hash random-seed2) are not the ones the store was cached with (random-seed1)" in str(info.value)
    assert not (out / "deep.safetensors").exists() and not (out / "run.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the training-phase peak uses Linux's VmHWM reset")
def test_peak_memory_is_the_training_phases_own(tmp_path):
    """The reported peak is what training holds (the trained model, its gradients, the optimizer
    state, activations), not the process's lifetime peak: FT (every block of synth-vit) must
    report clearly more than LSkip at omega 4 (half the blocks), measured in this same process.
    (Before, both reported the process's ru_maxrss: the same number.)"""
    peaks = {}
    for omega in (0, 4):
        store = run_cache(CacheConfig(dataset="synthetic", dataset_options={"num_classes": 4, "test_per_class": 2},
                                      model="synth-vit", pretrained="synth", omega=omega, shots=8, device="cpu",
                                      progress=False, root=tmp_path / "stores")).path
        result = run_tune(TuneConfig(store=store, out=tmp_path / f"run{omega}", epochs=1, batch_size=8, cskip=False,
                                     device="cpu", progress=False))
        peaks[omega] = result.peak_memory_mib, result.peak_memory_method
    # trained parameters: 11.5 M (FT) vs 5.8 M; weights + gradients + momentum alone differ by ~65 MiB
    assert peaks[0][0] > peaks[4][0] + 40, peaks
    assert "training" in peaks[0][1]
