"""Every stage end to end on CUDA, against the same stages on the CPU. Skipped without a GPU;
`make gpu-check` runs them (the CPU-only suite checks placement on the `meta` device instead,
see test_placement.py)."""

import pytest
import torch

import skipcache
from skipcache.stages.evaluate import run_eval
from skipcache.stages.export import run_export, run_predict

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same cache built on the CPU and on CUDA."""
    base = tmp_path_factory.mktemp("cuda")
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = skipcache.cache(skipcache.CacheConfig(
            dataset="synthetic", dataset_options={"num_classes": 8}, model="tiny", pretrained="none", omega=2,
            shots=4, views=2, root=base / device, device=device, dtype="float32", progress=False))
    return base, out


def test_cache_on_cuda_matches_the_cpu(stores):
    _, out = stores
    cpu = skipcache.FeatureStore.open(out["cpu"].path).read_split("train")
    gpu = skipcache.FeatureStore.open(out["cuda"].path).read_split("train")
    assert torch.equal(cpu["labels"], gpu["labels"])
    assert torch.allclose(cpu["vision"], gpu["vision"], atol=1e-3)
    assert torch.allclose(cpu["zeroshot_logits"], gpu["zeroshot_logits"], atol=1e-2)


@pytest.mark.parametrize("settings", [{}, {"cskip": False}, {"cskip": {"subset": "image"}}, {"rank": "dynamic"},
                                      {"batching": "class"}, {"cskip": {"variant": "paper-code"}}, {"precision": "fp32"}])
def test_tune_eval_export_predict_on_cuda(stores, settings, tmp_path):
    base, out = stores
    run = skipcache.tune(skipcache.TuneConfig(store=out["cuda"].path, out=tmp_path / "run", epochs=2, batch_size=4,
                                              warmup_epochs=0, lr=1e-3, device="cuda", progress=False, **settings))
    assert run.final["loss"] == run.final["loss"]  # not NaN
    assert run.peak_memory_method == "torch.cuda.max_memory_allocated"
    result = run_eval(run.run_dir, device="cuda")
    assert set(result.accuracy) >= {"base", "new", "H"}
    exported = run_export(run.run_dir, out=tmp_path / "export")
    assert exported.path.exists()


def test_cuda_and_cpu_tuning_agree(stores, tmp_path):
    """fp32 on both: the same store, seed and settings give close weights after one epoch."""
    from safetensors.torch import load_file

    _, out = stores
    weights = {}
    for device in ("cpu", "cuda"):
        run = skipcache.tune(skipcache.TuneConfig(store=out["cpu"].path, out=tmp_path / device, epochs=1, batch_size=4,
                                                  warmup_epochs=0, lr=1e-3, cskip=False, precision="fp32",
                                                  device=device, progress=False))
        weights[device] = load_file(str(run.run_dir / "deep.safetensors"))
    for k, w in weights["cpu"].items():
        assert torch.allclose(w, weights["cuda"][k], atol=1e-4), k


def test_predict_on_cuda(stores, tmp_path):
    from PIL import Image

    _, out = stores
    run = skipcache.tune(skipcache.TuneConfig(store=out["cuda"].path, out=tmp_path / "run", epochs=1, warmup_epochs=0,
                                              device="cuda", progress=False))
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    preds = run_predict(run.run_dir, [image], top_k=3, device="cuda")
    assert len(preds) == 1 and len(preds[0].top) == 3
