"""Device placement, checked without a GPU.

Every stage puts its modules on the device through `Placement`. These tests build each stage's
compute on the `meta` device through the stage's own set-up code and run it under
`OneDevice`, a torch function mode that fails any op whose tensor arguments sit on two devices.
A weight or buffer left on the CPU (the bug that once stopped every stage on CUDA: a causal
mask kept as a buffer outside the moved model) fails here the way it fails on a GPU.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from skipcache.loading import load_model, tokenizer_for
from skipcache.model import split_model
from skipcache.placement import Placement, misplaced
from skipcache.stages.cache import CacheConfig, FrozenForward, run_cache
from skipcache.stages.tune import TuneConfig, setup_training
from skipcache.store import FeatureStore

META = Placement(torch.device("meta"))


class OneDevice(TorchFunctionMode):
    """Raise when an op mixes devices (0-dim CPU tensors excepted: torch allows those as scalars)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device.type for t in pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise AssertionError(f"{getattr(func, '__name__', func)} mixes devices {sorted(devices)}")
        return func(*args, **kwargs)


def test_the_detector_catches_a_buffer_left_on_the_cpu():
    """The old cache stage moved `lm.model` only; the deep text half's mask stayed on the CPU."""
    lm = load_model("tiny", "none")
    shallow, deep = split_model(lm.model, 2)
    lm.model.to("meta")
    assert any("attn_mask" in name for name in misplaced(torch.device("meta"), deep))
    tokens = torch.zeros(3, 5, deep.text.ln_final.normalized_shape[0], device="meta")
    with pytest.raises(AssertionError, match="mixes devices"), OneDevice():
        deep.text(tokens, torch.zeros(3, dtype=torch.long, device="meta"))


def test_cache_stage_compute_is_wholly_on_the_device():
    lm = load_model("tiny", "none")
    frozen = FrozenForward(lm, 2, META)
    assert misplaced(torch.device("meta"), frozen.shallow, frozen.deep) == []
    token_ids = tokenizer_for("tiny")(["a photo of a cat.", "a photo of a red square."])  # on the CPU, as the stage makes them
    images = torch.zeros(2, 3, 3, lm.image_size, lm.image_size)  # (B, V, 3, H, W) from the loader, on the CPU
    with OneDevice():
        tokens, eot, prototypes = frozen.text(token_ids)
        vision, logits = frozen.images(images, prototypes)
    assert {t.device.type for t in (tokens, eot, prototypes, vision, logits)} == {"meta"}
    assert vision.shape[:2] == (3, 2) and logits.shape == (2, 2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cached = run_cache(CacheConfig(dataset="synthetic", dataset_options={"num_classes": 12}, model="tiny",
                                   pretrained="none", omega=2, shots=4, root=root, device="cpu", progress=False))
    return FeatureStore.open(cached.path)


@pytest.mark.parametrize("settings", [
    {},  # the default: batch-shared CSkip subset
    {"cskip": False},
    {"rank": "dynamic"},
    {"cskip": {"variant": "paper-code"}},
    {"precision": "bf16"},
    {"method": "lora"},  # the baselines (skipcache.baselines): their models and steps, placed the same way
    {"method": "coop", "method_options": {"n_ctx": 4}},
    {"method": "clip-adapter"},
])
def test_tune_step_is_wholly_on_the_device(store, settings):
    cfg = TuneConfig(store=store.path, batch_size=4, device="cpu", progress=False, **settings)
    training = setup_training(cfg, store, META)
    assert misplaced(torch.device("meta"), training.deep) == []
    assert {k: t.device.type for k, t in training.step.tensors().items()} == {k: "meta" for k in training.step.tensors()}
    batch = next(store.iter_batches("train", 4, shuffle=False))
    batch = {k: v.to("meta") for k, v in batch.items()}  # what prefetch_to_device hands over
    with OneDevice():
        stats = training.step(batch)
    assert stats.device.type == "meta"
    for state in training.optimizer.state.values():
        assert all(v.device.type == "meta" for v in state.values() if isinstance(v, torch.Tensor))


def test_placement_resolves_precision_per_device():
    assert Placement.resolve("cpu").compute_dtype is None
    assert Placement.resolve("cpu", "bf16").compute_dtype == torch.bfloat16
    with pytest.raises(Exception, match="precision must be one of"):
        Placement.resolve("cpu", "fp8")
