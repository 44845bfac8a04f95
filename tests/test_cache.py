"""Cache stage: stored tokens equal the model's own shallow forward, views, workers, templates."""

import pytest
import torch

from skipcache.data import build_task, get_dataset, load_image
from skipcache.loading import load_model, tokenizer_for
from skipcache.model import split_model
from skipcache.preprocess import eval_transform
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.tune import TuneConfig, run_tune
from skipcache.store import FeatureStore

BASE = dict(dataset="synthetic", dataset_options={"num_classes": 4}, model="tiny", pretrained="none", omega=2,
            shots=4, device="cpu", progress=False)


def test_stored_tokens_and_logits_match_an_independent_forward(tmp_path):
    cached = run_cache(CacheConfig(**BASE, dtype="float32", root=tmp_path))
    store = FeatureStore.open(cached.path)
    data = store.read_split("test_new")
    lm = load_model("tiny", "none", seed=1)
    shallow, deep = split_model(lm.model, 2)
    task = build_task(get_dataset("synthetic", num_classes=4), shots=4, seed=1, classes="base")
    split = task.splits["test_new"]
    x = torch.stack([eval_transform(lm)(load_image(e)) for e in split.examples[:5]])
    with torch.no_grad():
        tokens = shallow.vision(x)
        image = torch.nn.functional.normalize(lm.model.encode_image(x), dim=-1)
        prompts = tokenizer_for("tiny")([f"a photo of a {task.classnames[c]}." for c in split.classes])
        text = lm.model.encode_text(prompts)  # the full, untrimmed open_clip forward
        logits = lm.model.logit_scale.exp() * image @ torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(data["vision"][0, :5], tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(data["zeroshot_logits"][:5], logits, rtol=1e-4, atol=1e-3)
    assert store.read_source_ids("test_new")[:5] == [e.source_id for e in split.examples[:5]]


@pytest.fixture(scope="module")
def two_view_store(tmp_path_factory):
    return run_cache(CacheConfig(**BASE, views=2, root=tmp_path_factory.mktemp("two_views"))).path


def test_views_are_distinct_augmentations(two_view_store):
    store = FeatureStore.open(two_view_store)
    train = store.read_split("train")
    assert train["vision"].shape[0] == 2 and store.read_split("test_base")["vision"].shape[0] == 1
    assert not torch.equal(train["vision"][0], train["vision"][1])
    assert store.key["augment"] is not None and store.key["views"] == 2


@pytest.mark.parametrize("batching", ["shuffle", "class"])
def test_epoch_e_trains_on_view_e_mod_v(tmp_path, monkeypatch, two_view_store, batching):
    """Every batch a training step sees in epoch e holds view e mod V of its rows (V = 2, 3 epochs)."""
    from skipcache.step import TuneStep

    seen = []  # (row indices, image tokens) of every step, in order
    step = TuneStep.__call__

    def recording(self, batch):
        seen.append((batch["index"].cpu().clone(), batch["vision"].float().cpu().clone()))
        return step(self, batch)

    monkeypatch.setattr(TuneStep, "__call__", recording)
    run_tune(TuneConfig(store=two_view_store, out=tmp_path / "run", epochs=3, batch_size=4, batching=batching,
                        device="cpu", progress=False))
    views = FeatureStore.open(two_view_store).read_split("train")["vision"]  # (V, n, Lv, Dv)
    n, per_epoch = views.shape[1], 2  # 2 classes x 4 shots: 2 steps of 4 per epoch
    assert len(seen) == 3 * per_epoch
    for i, (rows, tokens) in enumerate(seen):
        epoch = i // per_epoch
        assert torch.equal(tokens, views[epoch % 2, rows]), f"step {i} (epoch {epoch}) did not read view {epoch % 2}"
        assert not torch.equal(tokens, views[1 - epoch % 2, rows])
    for epoch in range(3):  # every row once per epoch
        rows = torch.cat([r for r, _ in seen[epoch * per_epoch:(epoch + 1) * per_epoch]])
        assert sorted(rows.tolist()) == list(range(n))


def test_workers_give_the_same_store_as_the_main_process(tmp_path):
    a = run_cache(CacheConfig(**BASE, views=2, root=tmp_path / "a"))
    b = run_cache(CacheConfig(**BASE, views=2, workers=2, batch_size=3, root=tmp_path / "b"))
    assert a.path.name == b.path.name  # workers and batch size are not part of the key
    sa, sb = FeatureStore.open(a.path), FeatureStore.open(b.path)
    for split in sa.splits:
        da, db = sa.read_split(split, dtype=None), sb.read_split(split, dtype=None)
        assert torch.equal(da["vision"], db["vision"]) and torch.equal(da["zeroshot_rank"], db["zeroshot_rank"])


def test_template_changes_the_key_and_the_prototypes(tmp_path):
    a = run_cache(CacheConfig(**BASE, root=tmp_path))
    b = run_cache(CacheConfig(**BASE, template="a drawing of a {}.", root=tmp_path))
    assert a.path != b.path
    ta, tb = FeatureStore.open(a.path).read_text(), FeatureStore.open(b.path).read_text()
    assert tb["template"] == "a drawing of a {}." and not torch.equal(ta["prototypes"], tb["prototypes"])


@pytest.mark.parametrize("field, value, message", [
    ("omega", -1, "omega must be >= 0"),
    ("workers", -1, "workers must be >= 0"),
])
def test_cache_config_refuses_negative_counts_before_writing(tmp_path, field, value, message):
    from skipcache.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_cache(CacheConfig(dataset="synthetic", dataset_options={"num_classes": 4}, model="tiny", pretrained="none",
                              root=tmp_path / "store", device="cpu", progress=False, **{field: value}))
    assert not (tmp_path / "store").exists()


def test_shots_zero_and_none_name_the_same_store(tmp_path):
    """`--shots 0` on the CLI and CacheConfig(shots=0) in Python both mean every image: one key."""
    common = dict(dataset="synthetic", dataset_options={"num_classes": 4}, model="tiny", pretrained="none", omega=1,
                  root=tmp_path / "store", device="cpu", progress=False)
    first = run_cache(CacheConfig(shots=0, **common))
    second = run_cache(CacheConfig(shots=None, **common))
    assert second.reused and second.path == first.path
    assert first.key["shots"] is None
