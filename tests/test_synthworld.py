"""Tests of the synthetic world: renderer, captions, tasks, dataset adapter and pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from skipcache.data.base import Dataset, load_image
from skipcache.data.synthetic import load_synthetic
from skipcache.errors import ConfigError, ModelError
from skipcache.synthworld import pretrain as pt
from skipcache.synthworld.captions import caption_scenes, colour_shape_classnames
from skipcache.synthworld.render import COLOUR_RGB, COLOURS, DOMAINS, SHAPES, render, sample_scenes
from skipcache.synthworld.tasks import TASKS, make_split

ALL_CLASSES = torch.arange(len(COLOURS) * len(SHAPES))


def _scenes(domain="plain", n=100, seed=0, classes=ALL_CLASSES):
    return sample_scenes(n, torch.Generator().manual_seed(seed), domain, classes=classes)


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_shapes_dtype_and_determinism(domain):
    a = render(_scenes(domain, seed=3), 48)
    b = render(_scenes(domain, seed=3), 48)
    c = render(_scenes(domain, seed=4), 48)
    assert a.shape == (100, 3, 48, 48) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_render_of_a_scene_does_not_depend_on_its_batch():
    scenes = _scenes("shifted")
    whole = render(scenes, 32)
    assert torch.equal(whole[10:20], render(scenes.slice(10, 20), 32))


def _object_masks(domain="plain"):
    """Render each class with and without its object; the pixels that differ are the object."""
    scenes = _scenes(domain)
    with_obj = render(scenes, 48).float()
    scenes.size = scenes.size * 1e-4  # shrink the object to nothing, same background and noise
    without = render(scenes, 48).float()
    return scenes, with_obj, (with_obj - without).abs().sum(1) > 30  # (B, H, W)


def test_every_class_renders_a_visible_object():
    _, _, mask = _object_masks()
    area = mask.flatten(1).sum(1)  # (B,)
    assert (area > 40).all(), f"classes with tiny objects: {torch.nonzero(area <= 40).flatten().tolist()}"


def test_object_colour_is_nearest_to_its_named_colour():
    scenes, images, mask = _object_masks()
    solid = scenes.texture == 0
    assert solid.all()
    mean_rgb = (images * mask[:, None]).flatten(2).sum(2) / mask.flatten(1).sum(1, keepdim=True) / 255.0  # (B, 3)
    nearest = torch.cdist(mean_rgb, COLOUR_RGB).argmin(1)
    assert torch.equal(nearest, scenes.colour)


def test_sample_scenes_rejects_bad_input():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="unknown domain"):
        sample_scenes(4, g, "cartoon")
    with pytest.raises(ValueError, match="classes must have shape"):
        sample_scenes(4, g, "plain", classes=torch.arange(3))


def test_captions_name_colour_and_shape():
    scenes = _scenes("pretrain", n=400, classes=None)
    captions = caption_scenes(scenes, torch.Generator().manual_seed(0))
    assert len(captions) == 400
    for cap, c, s in zip(captions, scenes.colour.tolist(), scenes.shape.tolist()):
        assert COLOURS[c] in cap and SHAPES[s] in cap, cap
    prompt_form = sum(cap == f"a photo of a {COLOURS[c]} {SHAPES[s]}.".replace("a orange", "an orange")
                      for cap, c, s in zip(captions, scenes.colour.tolist(), scenes.shape.tolist()))
    assert prompt_form > 40  # the downstream prompt form is frequent
    assert not any(" a orange" in cap or cap.startswith("a orange") for cap in captions)


def test_captions_fit_the_context_length():
    tokenizer = pt.create_synth_model()[1]
    g = torch.Generator().manual_seed(1)
    captions = set()
    for _ in range(5):
        captions.update(caption_scenes(sample_scenes(1000, g, "pretrain"), g))
    longest = max(len(tokenizer.encode(c)) for c in captions)
    assert longest + 2 <= tokenizer.context_length
    # Every id a caption produces is among the ids the exported model keeps.
    kept = set(pt.kept_token_ids(tokenizer).tolist())
    assert set(torch.unique(tokenizer(sorted(captions))).tolist()) <= kept


def test_classnames_are_colour_major():
    names = colour_shape_classnames()
    assert len(names) == 100 and len(set(names)) == 100
    assert names[0] == f"{COLOURS[0]} {SHAPES[0]}" and names[1] == f"{COLOURS[0]} {SHAPES[1]}"
    assert names[10] == f"{COLOURS[1]} {SHAPES[0]}"


def test_make_split_sizes_labels_and_determinism():
    images, labels, names = make_split("synthetic", "train", 3, seed=0, size=32, num_classes=5)
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert names == colour_shape_classnames()[:5]
    make_split("synthetic", "test", 2, seed=0, size=32, num_classes=5)  # rendering another split first...
    again, _, _ = make_split("synthetic", "train", 3, seed=0, size=32, num_classes=5)
    assert again.tobytes() == images.tobytes()  # ...changes nothing
    other, _, _ = make_split("synthetic", "test", 3, seed=0, size=32, num_classes=5)
    reseeded, _, _ = make_split("synthetic", "train", 3, seed=1, size=32, num_classes=5)
    assert not np.array_equal(other, images) and not np.array_equal(reseeded, images)


def test_make_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_split("nope", "train", 1, 0)
    with pytest.raises(ValueError, match="unknown split"):
        make_split("synthetic", "dev", 1, 0)
    with pytest.raises(ValueError, match="num_classes"):
        make_split("synthetic", "train", 1, 0, num_classes=101)


def test_tasks_cover_domain_shifts():
    assert {"synthetic", "synthetic-sketch", "synthetic-noise"} <= set(TASKS)
    assert TASKS["synthetic"].domain == "shifted"


def test_load_synthetic_returns_a_valid_dataset():
    ds = load_synthetic("synthetic-sketch", num_classes=4, train_per_class=2, val_per_class=1, test_per_class=3,
                        image_size=32)
    assert isinstance(ds, Dataset) and ds.num_classes == 4
    assert ds.templates[0] == "a photo of a {}."
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 8, "val": 4, "test": 12}
    ex = ds.splits["test"][5]
    assert ex.source_id == "synthetic-sketch:test:5" and ex.label == 1
    assert ex.pixels.shape == (32, 32, 3) and ex.pixels.dtype == np.uint8
    assert load_image(ex).mode == "RGB" and load_image(ex).size == (32, 32)
    assert ds.fingerprint_extra["render_version"] >= 1
    same = load_synthetic("synthetic-sketch", num_classes=4, train_per_class=2, val_per_class=1, test_per_class=3,
                          image_size=32)
    assert same.fingerprint() == ds.fingerprint()
    assert np.array_equal(same.splits["train"][0].pixels, ds.splits["train"][0].pixels)
    reseeded = load_synthetic("synthetic-sketch", num_classes=4, train_per_class=2, val_per_class=1,
                              test_per_class=3, image_size=32, seed=1)
    assert reseeded.fingerprint() != ds.fingerprint()


def test_load_synthetic_errors_are_config_errors():
    with pytest.raises(ConfigError, match="unknown synthetic task"):
        load_synthetic("synthetic-cartoon")
    with pytest.raises(ConfigError, match="num_classes"):
        load_synthetic("synthetic", num_classes=0, train_per_class=1, val_per_class=1, test_per_class=1)


def test_clip_loss_treats_identical_captions_as_positives():
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    groups = torch.tensor([0, 0, 1, 2])
    loss = pt.clip_loss(f, f, torch.tensor(10.0), groups)
    # Images 0 and 1 share a caption: the target puts half its mass on each.
    distinct = pt.clip_loss(f, f, torch.tensor(10.0), torch.arange(4))
    assert torch.isfinite(loss) and not torch.isclose(loss, distinct)


def test_weight_decay_groups():
    model, _ = pt.create_synth_model()
    decay, no_decay = pt.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "embedding" not in names[id(p)] for p in decay["params"])
    assert any("token_embedding" in names[id(p)] for p in no_decay["params"])
    assert any("logit_scale" in names[id(p)] for p in no_decay["params"])


def test_lr_schedule_warms_up_and_decays():
    assert pt.lr_factor(0, 10, 0.0) == pytest.approx(0.1)
    assert pt.lr_factor(10, 10, 0.0) == pytest.approx(1.0)
    assert pt.lr_factor(100, 10, 0.5) == pytest.approx(0.51)
    assert pt.lr_factor(100, 10, 1.0) == pytest.approx(0.02)


def _encode_captions(state: dict, ids: torch.Tensor) -> torch.Tensor:
    """Text features of token ids under a synth-vit state dict (loaded into a fresh fp32 model)."""
    model, _ = pt.create_synth_model()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.encode_text(ids)


def _caption_ids(tokenizer) -> torch.Tensor:
    captions = caption_scenes(_scenes("pretrain", n=20, classes=None), torch.Generator().manual_seed(0))
    return tokenizer(["a photo of a red star.", *captions])


def test_exported_weights_encode_captions_as_the_full_embedding(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = pt.create_synth_model()
    path = tmp_path / "synth.safetensors"
    kept = pt.kept_token_ids(tokenizer)
    pt.export_synth_weights(model, path, kept)
    restored = pt.load_synth_state_dict(path)
    full = {k: v.half() for k, v in model.state_dict().items()}  # the file's fp16 rounding, every row kept
    dropped = torch.ones(full[pt.TOKEN_EMBEDDING_KEY].shape[0], dtype=torch.bool)
    dropped[kept] = False
    # The rows really differ (zeros in the file), so equal features say the captions never read them.
    assert (restored[pt.TOKEN_EMBEDDING_KEY][dropped] == 0).all() and (full[pt.TOKEN_EMBEDDING_KEY][dropped] != 0).any()
    ids = _caption_ids(tokenizer)
    assert torch.equal(_encode_captions(restored, ids), _encode_captions(full, ids))


@pytest.mark.slow
def test_three_step_pretrain_exports_loadable_weights(tmp_path, monkeypatch):
    exported = {}  # the state dict of the model each export was made from, before fp16 and dropping rows
    export = pt.export_synth_weights

    def remember(model, path, kept_ids, metadata=None):
        exported[Path(path).name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        export(model, path, kept_ids, metadata)

    monkeypatch.setattr(pt, "export_synth_weights", remember)
    cfg = pt.PretrainConfig(out=tmp_path, steps=3, batch_size=8, eval_per_class=1, prefetch=True)
    card = pt.pretrain(cfg)
    assert card["error"] is None and card["steps"] == 3 and card["reload_check_ok"]
    assert json.loads((tmp_path / "model_card.json").read_text())["steps"] == 3
    lines = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert {"step", "time_s", "loss", "zs_plain", "zs_synthetic", "zs_base", "zs_new"} <= set(lines[-1])

    state = pt.load_synth_state_dict(tmp_path / "synth.safetensors")
    model, tokenizer = pt.create_synth_model()
    model.load_state_dict(state, strict=True)
    emb = state[pt.TOKEN_EMBEDDING_KEY]  # (V, W)
    kept = pt.kept_token_ids(tokenizer)
    dropped = torch.ones(emb.shape[0], dtype=torch.bool)
    dropped[kept] = False
    assert emb.shape[0] == 49408 and (emb[dropped] == 0).all()
    assert (emb[kept].abs().sum(1) > 0).all()
    # Captions encode the same with the restored embedding as with the full one it came from
    # (the trained EMA model, rounded to fp16 like the file, all 49,408 rows kept).
    full = {k: v.half() for k, v in exported["synth.safetensors"].items()}
    assert (full[pt.TOKEN_EMBEDDING_KEY][dropped] != 0).any()
    ids = _caption_ids(tokenizer)
    assert torch.equal(_encode_captions(state, ids), _encode_captions(full, ids))


def test_load_synth_state_dict_rejects_other_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        pt.load_synth_state_dict(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="not a synth weights file"):
        pt.load_synth_state_dict(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read"):
        pt.load_synth_state_dict(tmp_path / "junk.safetensors")


def test_model_config_matches_the_brief():
    cfg = json.loads(pt.CONFIG_PATH.read_text())
    assert cfg["vision_cfg"]["layers"] >= 8 and cfg["text_cfg"]["layers"] >= 8
    open_clip.add_model_config(str(pt.CONFIG_PATH))
    model = open_clip.create_model("synth-vit", pretrained=None)
    x = torch.zeros(2, 3, 48, 48)
    assert model.encode_image(x).shape == (2, cfg["embed_dim"])
