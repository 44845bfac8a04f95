"""The synthetic base-to-new benchmark of `make demo` (pipelines/demo.toml, synthetic-shades).

What the benchmark must show is the paper's regime, not a winner: the shipped model leaves
headroom on both halves, and full fine-tuning on the base classes lifts them by at least 10 points
while the new classes gain nothing (what tuning learns about the base classes' shades does not
transfer, and forgetting takes its toll). Whether Skip Tuning beats FT is what the demo measures;
no test asserts it. The slow test runs the demo's FT exactly as the demo file writes it, seed 1.

Test splits have 20 images per class, 500 per half: one accuracy has a standard error of about
1.7 points near 85%. The demo measured (seed 1) zero-shot 82.0 / 85.2 and FT 96.8 / 78.2 (base /
new), so the thresholds below sit about 5 and 9 points from the measured values.
"""

import tomllib
from pathlib import Path

import pytest
import torch

from skipcache.loading import load_model, tokenizer_for
from skipcache.pipeline import load_pipeline, plan_runs
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.evaluate import run_eval
from skipcache.stages.tune import TuneConfig, run_tune
from skipcache.synthworld.tasks import make_split

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml"
HEADROOM = (60.0, 92.0)  # zero-shot accuracy of each half: far above chance (4%), well below the ceiling
BASE_GAIN = 10.0  # FT's base accuracy over zero-shot's, at least
NEW_GAIN = 2.0  # FT's new-class accuracy over zero-shot's, at most
RECIPE = ("epochs", "batch_size", "lr", "lr_image", "warmup_epochs", "weight_decay", "momentum")


def _demo() -> tuple[dict, dict]:
    spec = tomllib.loads(DEMO.read_text())
    return spec["cache"], {m["name"]: m for m in spec["method"]}


def test_shipped_model_leaves_headroom_on_both_halves():
    """Zero-shot on the demo task's test images (8 per class here), each half among its own 25 classes."""
    lm, tokenizer = load_model("synth-vit", "synth"), tokenizer_for("synth-vit")
    images, labels, names = make_split("synthetic-shades", "test", 8, 0, lm.image_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    x = (x - torch.tensor(lm.mean).view(1, 3, 1, 1)) / torch.tensor(lm.std).view(1, 3, 1, 1)
    labels = torch.from_numpy(labels)
    half = len(names) // 2
    with torch.no_grad():
        text = lm.model.encode_text(tokenizer([f"a photo of a {n}." for n in names]), normalize=True)  # (50, D)
        image = lm.model.encode_image(x, normalize=True)  # (N, D)
    for lo, hi in ((0, half), (half, len(names))):
        rows = (labels >= lo) & (labels < hi)
        pred = (image[rows] @ text[lo:hi].T).argmax(1) + lo
        accuracy = 100 * (pred == labels[rows]).float().mean().item()
        assert HEADROOM[0] <= accuracy <= HEADROOM[1], (names[lo], accuracy)


def test_demo_and_omega_ablation_train_every_method_with_one_recipe_over_three_seeds():
    """FT, FT + LSkip, Skip Tuning (demo) and Skip Tuning at omega 0 (= FT + CSkip), 2, 4, 6: one
    task, one budget, seeds 1-3, so the rows differ only in what the paper's ablation varies."""
    _, methods = _demo()
    tuned = {name: m for name, m in methods.items() if m["kind"] == "tune"}
    assert {name: (m["omega"], m["cskip"] is not False) for name, m in tuned.items()} == {
        "FT": (0, False), "FT + LSkip": (4, False), "Skip Tuning": (4, True)}
    omega = tomllib.loads((DEMO.parent / "synthetic-omega.toml").read_text())
    ablation = [m for m in omega["method"] if m["kind"] == "tune"]
    assert [(m["omega"], m.get("cskip", True)) for m in ablation] == [(w, True) for w in (0, 2, 4, 6)]
    assert len({tuple(m.get(k) for k in RECIPE) for m in [*tuned.values(), *ablation]}) == 1
    assert omega["cache"] == _demo()[0]
    for path in (DEMO, DEMO.parent / "synthetic-omega.toml"):
        spec = load_pipeline(path)
        assert spec["grid"]["seed"] == [1, 2, 3] and len(plan_runs(spec)) == 3 * len(spec["method"])


@pytest.mark.slow
def test_full_fine_tuning_lifts_base_classes_but_not_new_ones(tmp_path):
    cache, methods = _demo()
    ft = methods["FT"]
    cached = run_cache(CacheConfig(**dict(cache, omega=ft["omega"], seed=1), root=tmp_path / "store", device="cpu",
                                   progress=False))
    recipe = {k: v for k, v in ft.items() if k not in ("name", "kind", "omega")}
    run = run_tune(TuneConfig(store=cached.path, out=tmp_path / "run", seed=1, device="cpu", progress=False, **recipe))
    result = run_eval(run.run_dir, device="cpu")
    zs, tuned = result.zeroshot, result.accuracy
    assert HEADROOM[0] <= min(zs["base"], zs["new"]) and max(zs["base"], zs["new"]) <= HEADROOM[1], zs
    assert tuned["base"] >= zs["base"] + BASE_GAIN, (zs, tuned)
    assert tuned["new"] <= zs["new"] + NEW_GAIN, (zs, tuned)
