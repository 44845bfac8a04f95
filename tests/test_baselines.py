"""The paper's baselines in the tune stage's harness (`skipcache.baselines`), on the tiny model.

Every method trains, evaluates, exports and reloads. The references are independent of the code
under test where it matters: the export is loaded by plain open_clip and run on the raw images
and the template prompts (LoRA: that checks the merge); CLIP-Adapter's exported matrices are
applied by the formula written out here; CoOp initialised from the template's own words must
give the store's zero-shot prototypes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from skipcache.baselines import METHODS, fast_omega, get_method
from skipcache.baselines.coop import CoOpModel
from skipcache.baselines.lora import LoRAModel, merge_lora
from skipcache.cli import app
from skipcache.errors import ConfigError, SkipcacheError
from skipcache.loading import load_model, tokenizer_for
from skipcache.model import split_model
from skipcache.placement import Placement
from skipcache.rundir import load_tuned
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.evaluate import run_eval
from skipcache.stages.export import run_export, run_predict
from skipcache.stages.tune import TuneConfig, run_tune
from skipcache.store import FeatureStore

CPU = Placement(torch.device("cpu"))
DEPTH = 6  # the tiny model's blocks per tower
NUM_CLASSES, SHOTS, SEED = 6, 4, 1
# method -> the omega of the store it trains on (tiny: fast = 6 - 6 // 4 = 5, N = 6)
OMEGA = {"skip-tuning": 3, "ft": 0, "ft-lskip": 3, "ft-cskip": 0, "fast": 5, "coop": DEPTH, "clip-adapter": DEPTH, "lora": 0,
         "paper-schedule": 0, "ft-conventional": 0}
OPTIONS = {"coop": {"n_ctx": 4}}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Path]:
    """float32 stores (cached and raw-image paths then differ only by float rounding), one per omega."""
    root = tmp_path_factory.mktemp("baseline_stores")
    return {omega: run_cache(CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": NUM_CLASSES, "test_per_class": 4}, model="tiny",
        pretrained="none", omega=omega, shots=SHOTS, seed=SEED, dtype="float32", root=root, device="cpu", progress=False)).path
        for omega in sorted(set(OMEGA.values()))}


def tune(store: Path, out: Path, method: str, **kw):
    settings = dict(epochs=2, lr=0.05, warmup_epochs=0, device="cpu", progress=False)
    settings.update(kw)
    return run_tune(TuneConfig(store=store, out=out, method=method, method_options=OPTIONS.get(method, {}), **settings))


def raw_split(split: str):
    """The split's test images as PIL images, from the dataset (not the store), and its class names."""
    from skipcache.data import build_task, get_dataset, load_image

    task = build_task(get_dataset("synthetic", None, num_classes=NUM_CLASSES, test_per_class=4), shots=SHOTS, seed=SEED,
                      classes="base")
    s = task.splits[split]
    return [load_image(ex) for ex in s.examples], [ex.source_id for ex in s.examples], [task.classnames[c] for c in s.classes]


def openclip_features(model, images, classnames, template="a photo of a {}."):
    """(unnormalized image features, normalized text features) of a plain open_clip model."""
    import open_clip

    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                           mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in images])
        image = model.encode_image(x)
        text = model.encode_text(open_clip.get_tokenizer("tiny")([template.format(c) for c in classnames]), normalize=True)
    return image, text


def tuned_features(run_dir: Path, split: str):
    """(normalized image features of the cached split, class features of its classes) from the tuned run."""
    tuned = load_tuned(run_dir, "cpu")
    store = tuned.store
    text = store.read_text()
    data = store.read_split(split)
    with torch.no_grad():
        image = tuned.deep.encode_image(data["vision"][0])
        classes = tuned.deep.encode_classes(text, torch.as_tensor(store.splits[split].classes))
    return image, classes, tuned


# ---------------------------------------------------------------------------- every method, end to end


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_evaluates_exports_and_reloads(tmp_path, stores, method):
    import open_clip

    run_dir = tmp_path / "run"
    result = tune(stores[OMEGA[method]], run_dir, method)
    record = json.loads((run_dir / "run.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == record["method"] == method
    assert record["trainable_parameters"] > 0 and result.final["loss"] > 0

    first = run_eval(run_dir, device="cpu")
    again = run_eval(run_dir, device="cpu")  # reloaded from the run directory: the same numbers
    assert first.accuracy == again.accuracy
    assert first.method == get_method(method).label(OMEGA[method], config["cskip"]["enabled"])
    assert json.loads((run_dir / "eval.json").read_text())["method"] == first.method

    exported = tmp_path / "model.safetensors"
    res = run_export(run_dir, exported)
    assert res.method == method
    model = open_clip.create_model("tiny", pretrained=str(exported)).eval()
    images, source_ids, names = raw_split("test_base")
    theirs_image, theirs_text = openclip_features(model, images, names)
    ours_image, ours_text, tuned = tuned_features(run_dir, "test_base")
    assert tuned.store.read_source_ids("test_base") == source_ids  # same images, same order
    pretrained = load_model("tiny", "none", seed=SEED).model.eval()
    base_image, base_text = openclip_features(pretrained, images, names)

    if method == "clip-adapter":
        # the export is the pretrained model; the adapter, beside it, applied by its formula
        assert res.extras is not None and res.extras.name == "model.clip-adapter.safetensors"
        torch.testing.assert_close(theirs_image, base_image, atol=1e-5, rtol=1e-5)
        with safe_open(str(res.extras), "pt") as f:
            w1, w2 = f.get_tensor("clip_adapter.fc1.weight"), f.get_tensor("clip_adapter.fc2.weight")
            ratio = float(f.metadata()["ratio"])
        adapted = ratio * F.relu(F.relu(theirs_image @ w1.T) @ w2.T) + (1 - ratio) * theirs_image
        torch.testing.assert_close(F.normalize(adapted, dim=-1), ours_image, atol=1e-4, rtol=1e-4)
        assert (F.normalize(adapted, dim=-1) - F.normalize(base_image, dim=-1)).abs().max() > 1e-3  # it learned something
        torch.testing.assert_close(theirs_text, ours_text, atol=1e-4, rtol=1e-4)  # the frozen prototypes
    elif method == "coop":
        assert res.extras is not None
        torch.testing.assert_close(theirs_image, base_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(F.normalize(theirs_image, dim=-1), ours_image, atol=1e-4, rtol=1e-4)
        with safe_open(str(res.extras), "pt") as f:
            features, ctx = f.get_tensor("coop.class_features"), f.get_tensor("coop.ctx")
            meta = f.metadata()
        assert ctx.shape == (OPTIONS["coop"]["n_ctx"], 64)
        assert meta["prompt"] == "X X X X {}."
        all_names = json.loads(meta["classnames"])
        ids = torch.tensor([all_names.index(n) for n in names])
        torch.testing.assert_close(features[ids], ours_text, atol=1e-4, rtol=1e-4)  # learned prompts, not the template
        assert (features[ids] - base_text).abs().max() > 1e-2
    else:
        # a plain open_clip checkpoint with the tuned (LoRA: merged) weights reproduces the run's features
        assert res.extras is None
        torch.testing.assert_close(F.normalize(theirs_image, dim=-1), ours_image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs_text, ours_text, atol=1e-4, rtol=1e-4)
        assert (theirs_image - base_image).abs().max() > 1e-3  # ... and those are not the pretrained ones

    preds = run_predict(run_dir, [_png(tmp_path, images[0])], top_k=2, device="cpu")
    assert len(preds) == 1 and len(preds[0].top) == 2


def _png(tmp_path: Path, image) -> Path:
    path = tmp_path / "img.png"
    image.save(path)
    return path


@pytest.mark.slow
def test_predict_uses_the_methods_head(tmp_path, stores):
    """CoOp's predict classifies with the learned prompts: the same top class as the cached path."""
    run_dir = tmp_path / "coop"
    tune(stores[DEPTH], run_dir, "coop", lr=0.5)
    images, _, names = raw_split("test_base")
    paths = []
    for i, im in enumerate(images[:6]):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    preds = run_predict(run_dir, paths, top_k=1, device="cpu")
    ours_image, _, tuned = tuned_features(run_dir, "test_base")
    text = tuned.store.read_text()
    every = tuned.deep.encode_classes(text, torch.arange(len(text["classnames"])))
    best = (ours_image[:6] @ every.T).argmax(1)
    assert [p.top[0][0] for p in preds] == [text["classnames"][int(i)] for i in best]


# ------------------------------------------------------------------------------ settings and checks


def test_the_registry_names_every_method():
    assert list(METHODS) == ["skip-tuning", "ft", "ft-lskip", "ft-cskip", "fast", "coop", "clip-adapter", "lora",
                             "paper-schedule", "ft-conventional"]
    with pytest.raises(ConfigError, match="method must be one of skip-tuning, ft, "):
        get_method("adam")
    assert fast_omega(12) == 9 and fast_omega(8) == 6 and fast_omega(6) == 5


@pytest.mark.parametrize("method, omega, message", [
    ("ft", 3, "needs a store cached with --omega 0, this one has omega 3"),
    ("ft-cskip", 3, "needs a store cached with --omega 0"),
    ("ft-lskip", 0, "needs a store cached with --omega > 0"),
    ("fast", 3, "preset with omega = 5 for this model (6 blocks per tower: N - N//4); cache a store with --omega 5"),
    ("paper-schedule", 3, "runs every block in every step: it needs a store cached with --omega 0 (add --views E"),
    ("ft-conventional", 5, "needs a store cached with --omega 0"),
])
def test_a_method_refuses_a_store_of_the_wrong_omega(tmp_path, stores, method, omega, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tune(stores[omega], tmp_path / "run", method)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("settings, message", [
    ({"method": "ft-cskip", "cskip": False}, "method 'ft-cskip' trains with CSkip; drop --no-cskip"),
    ({"method": "fast", "cskip": {"r": 0.3}}, "method 'fast' is a preset with cskip.r = 0.25"),
    ({"method": "lora", "method_options": {"rank": 0}}, "method_options.rank must be a whole number >= 1"),
    ({"method": "lora", "method_options": {"dropout": 0.1}}, "method_options dropout are not settings of method 'lora' "
                                                             "(it takes: alpha, rank)"),
    ({"method": "clip-adapter", "method_options": {"ratio": 1.5}}, "method_options.ratio must be in [0, 1]"),
    ({"method": "coop", "method_options": {"ctx_init": ""}}, "method_options.ctx_init must be a phrase"),
    ({"method": "skip-tuning", "method_options": {"rank": 4}}, "it takes: none"),
    ({"method": "coop", "method_options": {"full_context": "yes"}}, "method_options.full_context must be true or false"),
    ({"method": "paper-schedule", "method_options": {"omega": -1}}, "method_options.omega must be a whole number >= 0"),
    ({"method": "ft-conventional", "method_options": {"omega": 3}}, "method_options omega are not settings of method 'ft-conventional'"),
    ({"method": "nope"}, "method must be one of"),
])
def test_bad_method_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TuneConfig(**settings).validate()


def test_ablation_names_set_cskip_and_are_recorded(tmp_path, stores):
    tune(stores[0], tmp_path / "ft", "ft", epochs=1)
    tune(stores[5], tmp_path / "fast", "fast", epochs=1)
    ft = json.loads((tmp_path / "ft" / "config.json").read_text())
    fast = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert ft["cskip"]["enabled"] is False and ft["method"] == "ft"
    assert fast["cskip"]["enabled"] is True and fast["cskip"]["r"] == 0.25
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["text_classes_per_step"] == 3  # every base class, no CSkip


def test_resume_refuses_another_method(tmp_path, stores):
    tune(stores[0], tmp_path / "run", "ft", epochs=1)
    with pytest.raises(SkipcacheError, match="method 'ft' -> 'lora'"):
        tune(stores[0], tmp_path / "run", "lora", epochs=1, resume=True)


# ------------------------------------------------------------------------------------ the models


def test_lora_starts_at_the_pretrained_model_and_merges_exactly():
    lm = load_model("tiny", "none")
    _, deep = split_model(lm.model, 2, keep_shallow=False)
    tokens = torch.randn(3, 17, 64)
    with torch.no_grad():
        before = deep.encode_image(tokens)
    model = LoRAModel(deep, rank=2, alpha=4.0)
    # q, k, v, out and the MLP's two layers of each of the 4 + 4 deep blocks; (A, B) per fused projection
    assert len(model.adapted) == 4 * 8
    in_proj = model.deep_state_dict()["visual.transformer.resblocks.2.attn.in_proj_weight.lora_A"]
    assert in_proj.shape == (3, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(tokens), before)  # B = 0: the pretrained model
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        adapted = model.encode_image(tokens)
        saved = model.deep_state_dict()
        merged = model.merged()
        torch.testing.assert_close(merged.encode_image(tokens), adapted, atol=1e-5, rtol=1e-5)
    assert (adapted - before).abs().max() > 1e-3
    # merge_lora on a plain state dict: W + (alpha / rank) B A, per q / k / v block of rows
    state = load_model("tiny", "none").model.state_dict()
    key = "visual.transformer.resblocks.2.attn.in_proj_weight"
    out = merge_lora(state, saved, alpha=4.0)
    a, b = saved[key + ".lora_A"], saved[key + ".lora_B"]
    expected = state[key] + 2.0 * torch.cat([b[i] @ a[i] for i in range(3)])
    torch.testing.assert_close(out[key], expected)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0  # merged: nothing left to train


def test_only_the_new_parameters_train(stores):
    store = FeatureStore.open(stores[DEPTH])
    for name, expected in (("coop", {"prompts.ctx"}), ("clip-adapter", {"adapter.fc1.weight", "adapter.fc2.weight"})):
        method = get_method(name)
        model, _ = method.build(store, CPU, None, method.resolve_options(OPTIONS.get(name, {})))
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    method = get_method("lora")
    model, _ = method.build(FeatureStore.open(stores[0]), CPU, None, method.resolve_options({}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_coop_initialised_from_the_template_words_gives_the_zero_shot_prototypes(stores):
    """`[SOT] a photo of a {name} . [EOT]` with the context set to "a photo of a"'s embeddings is
    the store's template prompt: the whole text tower must give the stored prototypes."""
    store = FeatureStore.open(stores[DEPTH])
    method = get_method("coop")
    model, options = method.build(store, CPU, None, method.resolve_options({"ctx_init": "a photo of a"}))
    assert isinstance(model, CoOpModel) and options["n_ctx"] == 4 and options["prefix"] == "a photo of a"
    text = store.read_text()
    assert text["template"] == "a photo of a {}."
    with torch.no_grad():
        features = model.encode_classes(text, torch.arange(NUM_CLASSES))
    torch.testing.assert_close(features, text["prototypes"], atol=1e-5, rtol=1e-5)


def test_coop_context_length_fits_the_model(stores):
    store = FeatureStore.open(stores[DEPTH])
    method = get_method("coop")
    model, options = method.build(store, CPU, None, method.resolve_options({}))
    # tiny's context is 16 tokens: SOT, EOT and the longest "{name}." (3 tokens) leave room for 11 < 16
    longest = max(int(tokenizer_for("tiny")([f"{n}."]).argmax()) - 1 for n in store.read_text()["classnames"])
    assert options["n_ctx"] == 16 - 2 - longest == model.prompts.n_ctx
    with pytest.raises(ConfigError, match="method_options.n_ctx 15 does not fit"):
        method.build(store, CPU, None, method.resolve_options({"n_ctx": 15}))


def test_clip_adapter_uses_the_frozen_prototypes_and_mixes_at_the_ratio(stores):
    store = FeatureStore.open(stores[DEPTH])
    method = get_method("clip-adapter")
    model, _ = method.build(store, CPU, None, method.resolve_options({"ratio": 0.0}))
    text = store.read_text()
    data = store.read_split("test_base")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_classes(text, torch.tensor([4, 1])), text["prototypes"][[4, 1]])
        image = model.encode_image(data["vision"][0])  # ratio 0: the frozen, zero-shot image feature
    logits = 100 * image @ text["prototypes"][torch.as_tensor(store.splits["test_base"].classes)].T
    zs = data["zeroshot_logits"]
    assert (logits.argmax(1) == zs.argmax(1)).all()


def _step_inputs(store: FeatureStore, rows: torch.Tensor) -> tuple[dict, dict]:
    """(the tune stage's `text` for the train classes, a batch of the train split's `rows`)."""
    text = store.read_text()
    classes = torch.as_tensor(store.splits["train"].classes)
    data = store.read_split("train")
    step_text = {"tokens": text["tokens"][classes], "eot": text["eot"][classes], "prototypes": text["prototypes"][classes],
                 "classnames": [text["classnames"][c] for c in classes], "class_ids": classes}
    batch = {"vision": data["vision"][0, rows], "labels": data["labels"][rows], "zeroshot_rank": data["zeroshot_rank"][rows],
             "index": rows}
    return step_text, batch


def test_ft_conventional_computes_open_clips_own_loss_on_raw_images_and_full_prompts(stores):
    """The conventional-FT step's loss is open_clip's: the plain model's forward on the raw images
    and the 77-token (here: the tiny model's whole 16-token) template prompts of every train class."""
    from skipcache.cskip import CSkipConfig
    from skipcache.step import make_optimizer

    store = FeatureStore.open(stores[0])
    method = get_method("ft-conventional")
    model, _ = method.build(store, CPU, None, method.resolve_options({}))
    assert model.full_tokens.shape[1] == tokenizer_for("tiny")(["x"]).shape[1]  # the whole context, not trimmed
    rows = torch.tensor([0, 5, 9, 2])
    text, batch = _step_inputs(store, rows)
    optimizer = make_optimizer(model.layer_groups(), {"vision": 0.1, "text": 0.1}, momentum=0.9, weight_decay=0.0, placement=CPU)
    step = method.make_step(model, text, method.resolve_cskip(CSkipConfig()), rank="zeroshot", batch_size=4,
                            optimizer=optimizer, placement=CPU, generator=None)
    stats = step(batch)
    images, _, names = raw_split("train")
    plain = load_model("tiny", "none", seed=SEED).model.eval()
    image, classes = openclip_features(plain, [images[i] for i in rows], names)
    with torch.no_grad():
        expected = F.cross_entropy(plain.logit_scale.exp() * F.normalize(image, dim=-1) @ classes.T, batch["labels"])
    assert float(stats[3]) == len(names)  # every class
    torch.testing.assert_close(stats[0] / stats[4], expected, atol=1e-4, rtol=1e-4)
    # one SGD step moved the weights: the next loss on the same batch is lower
    assert float(step(batch)[0] / 4) < float(expected)


def test_paper_schedule_trains_only_the_blocks_after_omega_and_sees_whole_prompts(tmp_path, stores):
    from safetensors.torch import load_file

    store = FeatureStore.open(stores[0])
    method = get_method("paper-schedule")
    model, options = method.build(store, CPU, None, method.resolve_options({}))
    assert options == {"omega": DEPTH // 2}
    text = store.read_text()
    with torch.no_grad():  # the whole-context prompts give the cached (trimmed) prompts' features: causal mask
        full = model.encode_text(model.full_tokens, model.full_eot)
        trimmed = model.encode_classes(text, torch.arange(NUM_CLASSES))
    torch.testing.assert_close(full, trimmed, atol=1e-5, rtol=1e-5)
    assert model.full_tokens.shape[1] > text["tokens"].shape[1]

    run = tune(stores[0], tmp_path / "run", "paper-schedule", epochs=2)
    saved = load_file(run.run_dir / "deep.safetensors")
    blocks = {int(k.split("resblocks.")[1].split(".")[0]) for k in saved if "resblocks." in k}
    assert blocks == set(range(DEPTH // 2, DEPTH))  # blocks 1..omega are frozen: not saved
    assert any(k.startswith("visual.transformer") for k in saved) and any(k.startswith("transformer") for k in saved)
    pretrained = load_model("tiny", "none", seed=SEED).model.state_dict()
    assert all((saved[k] - pretrained[k]).abs().max() > 0 for k in saved if k.endswith("mlp.c_fc.weight"))
    config, record = (json.loads((run.run_dir / name).read_text()) for name in ("config.json", "run.json"))
    assert config["cskip"]["variant"] == "paper-code" and record["method_options"] == {"omega": DEPTH // 2}


def test_coop_on_the_whole_context_gives_the_trimmed_prompts_features(stores):
    store = FeatureStore.open(stores[0])
    method = get_method("coop")
    trimmed, _ = method.build(store, CPU, None, method.resolve_options({"n_ctx": 4}))
    full, _ = method.build(store, CPU, None, method.resolve_options({"n_ctx": 4, "full_context": True}))
    with torch.no_grad():
        full.prompts.ctx.copy_(trimmed.prompts.ctx)
        names = store.read_text()["classnames"]
        embedded, _ = full.prompts.prompts(names)
        assert embedded.shape[1] == tokenizer_for("tiny")(["x"]).shape[1] > trimmed.prompts.prompts(names)[0].shape[1]
        torch.testing.assert_close(full.prompts.encode_names(names), trimmed.prompts.encode_names(names), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ the CLI


def test_tune_method_on_the_command_line(tmp_path, stores):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["tune", str(stores[DEPTH]), "--method", "clip-adapter", "--epochs", "1", "--out", str(run_dir),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "run.json").read_text())["method"] == "clip-adapter"
    shown = runner.invoke(app, ["eval", str(run_dir), "--device", "cpu", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["method"] == "CLIP-Adapter"
    bad = runner.invoke(app, ["tune", str(stores[3]), "--method", "ft", "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert bad.exit_code != 0 and "error: method 'ft' trains every block" in bad.stderr
    coop = runner.invoke(app, ["tune", str(stores[DEPTH]), "--method", "coop", "--method-option", "n_ctx=3",
                               "--method-option", "ctx_init=null", "--method-option", "full_context=true", "--epochs", "1",
                               "--out", str(tmp_path / "coop"), "--device", "cpu", "--json"])
    assert coop.exit_code == 0, coop.output
    assert json.loads((tmp_path / "coop" / "run.json").read_text())["method_options"] == {
        "n_ctx": 3, "ctx_init": None, "full_context": True, "prefix": "X X X"}
    for option, message in (("rank", "--method-option takes KEY=VALUE, got 'rank'"),
                            ("rank=0", "method_options.rank must be a whole number >= 1")):
        bad = runner.invoke(app, ["tune", str(stores[0]), "--method", "lora", "--method-option", option, "--device", "cpu"])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("method", ["lora", "coop", "clip-adapter", "paper-schedule"])
def test_an_interrupted_baseline_resumes_to_the_same_weights(tmp_path, stores, monkeypatch, method):
    """Killed right after its first checkpoint, the run continues from it (the method's own
    weights and the optimizer's momentum) to the bytes of an uninterrupted twin."""
    from safetensors.torch import load_file

    from skipcache import rundir

    store = stores[OMEGA[method]]
    twin = tune(store, tmp_path / "twin", method, epochs=3, checkpoint_every_s=0).run_dir
    save = rundir.TuneRun.save_checkpoint

    def save_then_die(self, epoch, *args, **kwargs):
        save(self, epoch, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.TuneRun, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tune(store, tmp_path / "run", method, epochs=3, checkpoint_every_s=0)
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["epoch"] == 1
    resumed = tune(store, tmp_path / "run", method, epochs=3, checkpoint_every_s=0, resume=True).run_dir
    ours, theirs = load_file(resumed / "deep.safetensors"), load_file(twin / "deep.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
