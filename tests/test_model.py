"""Model surgery: the split halves reproduce open_clip's own forward, and train what they should."""

import pytest
import torch

from skipcache.errors import ConfigError, ModelError
from skipcache.loading import load_model, tokenizer_for
from skipcache.model import DeepCLIP, check_omega, split_model

PROMPTS = ["a photo of a red circle.", "dog", "a photo of a very small green hexagon on a striped background"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "none", seed=0)


@pytest.fixture(scope="module")
def token_ids():
    return tokenizer_for("tiny")(PROMPTS)


# Every model config skipcache ships or names in its docs, random init (same architecture and cost
# as pretrained). ViT-B-16 takes a few seconds to build and run on a CPU.
SHIPPED_MODELS = ["tiny", "synth-vit", pytest.param("ViT-B-16", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_split_reproduces_encode_image_and_encode_text(name):
    lm = load_model(name, "none", seed=0)
    model = lm.model
    token_ids = tokenizer_for(name)(PROMPTS)
    blocks = len(model.visual.transformer.resblocks)
    images = torch.randn(2, 3, lm.image_size, lm.image_size, generator=torch.Generator().manual_seed(0))
    for omega in sorted({0, 1, blocks // 2, blocks}):
        shallow, deep = split_model(model, omega)
        with torch.no_grad():
            # The reference runs after the split: freezing a block changes which attention kernel
            # torch picks for it (last-bit differences, ~1e-6), in open_clip's own forward too.
            ref_image = model.encode_image(images)
            ref_text = model.encode_text(token_ids)
            image = deep.encode_image(shallow.vision(images), normalize=False)
            tokens, eot = shallow.text(token_ids, trim=False)
            text_untrimmed = deep.encode_text(tokens, eot, normalize=False)
        assert torch.equal(image, ref_image), f"{name} omega={omega}: image features differ from encode_image"
        assert torch.equal(text_untrimmed, ref_text), f"{name} omega={omega}: text features differ from encode_text"


@pytest.mark.parametrize("omega", [0, 3, 6])
def test_trimmed_text_equals_untrimmed(tiny, token_ids, omega):
    shallow, deep = split_model(tiny.model, omega)
    with torch.no_grad():
        full, eot = shallow.text(token_ids, trim=False)
        trimmed, eot_t = shallow.text(token_ids, trim=True)
        a = deep.encode_text(full, eot, normalize=False)
        b = deep.encode_text(trimmed, eot_t, normalize=False)
    assert trimmed.shape[1] == int(eot.max()) + 1 < full.shape[1]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_one_step_trains_every_deep_parameter_and_no_frozen_one(tiny, token_ids):
    model = load_model("tiny", "none", seed=0).model
    omega = 3
    shallow, deep = split_model(model, omega)
    deep_ids = {id(p) for p in deep.parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in deep_ids}
    assert frozen, "the model must have frozen parameters at omega=3"
    optimizer = torch.optim.SGD(deep.parameters(), lr=0.1)
    images = torch.randn(2, 3, 32, 32)
    img = deep.encode_image(shallow.vision(images))
    tokens, eot = shallow.text(token_ids)
    txt = deep.encode_text(tokens, eot)
    loss = torch.nn.functional.cross_entropy(deep.logit_scale * img @ txt.T, torch.tensor([0, 1]))
    loss.backward()
    for name, p in deep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    optimizer.step()
    for name, p in model.named_parameters():
        if id(p) not in deep_ids:
            assert not p.requires_grad, f"{name} should be frozen"
            assert torch.equal(p, frozen[name]), f"frozen parameter {name} changed"


def test_deep_state_dict_uses_open_clip_keys_and_round_trips(tiny):
    _, deep = split_model(tiny.model, 4)
    state = deep.deep_state_dict()
    full = tiny.model.state_dict()
    assert set(state) <= set(full)
    assert "visual.transformer.resblocks.4.attn.in_proj_weight" in state
    assert "visual.transformer.resblocks.3.attn.in_proj_weight" not in state
    assert {"visual.proj", "text_projection", "ln_final.weight", "visual.ln_post.weight"} <= set(state)
    for k, v in state.items():
        assert torch.equal(v, full[k])
    other = DeepCLIP(load_model("tiny", "none", seed=1).model, 4)
    other.load_deep_state_dict(state)
    for k, v in other.deep_state_dict().items():
        assert torch.equal(v, state[k])


def test_load_deep_state_dict_checks_keys_and_shapes(tiny):
    _, deep = split_model(tiny.model, 4)
    state = deep.deep_state_dict()
    state.pop("visual.proj")
    with pytest.raises(ModelError, match="missing"):
        deep.load_deep_state_dict(state)


def test_keep_shallow_false_frees_shallow_weights():
    lm = load_model("tiny", "none", seed=0)
    before = sum(p.numel() for p in lm.model.parameters())
    _, deep = split_model(lm.model, 6, keep_shallow=False)
    after = sum(p.numel() for p in lm.model.parameters())
    assert after < before - 49408 * 64  # the token embedding and all shallow blocks are gone
    assert len(deep.vision.resblocks) == 0 and len(deep.text.resblocks) == 0
    assert deep.encode_image(torch.randn(1, 17, 64)).shape == (1, 64)


def test_omega_out_of_range(tiny):
    with pytest.raises(ConfigError, match=r"omega must be in \[0, 6\].*got 7"):
        check_omega(tiny.model, 7)
    with pytest.raises(ConfigError):
        split_model(tiny.model, -1)


def test_non_transformer_tower_is_refused():
    import open_clip

    model = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(ModelError, match="not a ViT"):
        split_model(model, 2)


def test_unknown_model_and_missing_weights_file():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope", "none")
    with pytest.raises(ModelError, match="weights file not found"):
        load_model("tiny", "/no/such/file.safetensors")
    with pytest.raises(ModelError, match="no pretrained weights 'nope'"):
        load_model("ViT-B-16", "nope")


def test_offline_download_failure_says_what_to_do(monkeypatch):
    import open_clip

    def fail(*args, **kwargs):
        raise RuntimeError("Could not connect to huggingface.co")

    monkeypatch.setattr(open_clip, "create_model", fail)
    with pytest.raises(ModelError, match="--pretrained /path/to") as info:
        load_model("ViT-B-16", "openai")
    assert "synth-vit" in str(info.value)


def test_local_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    src = load_model("tiny", "none", seed=5).model
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    lm = load_model("tiny", str(path))
    assert lm.pretrained_label == "w"
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_local_dir_model_is_loaded(tmp_path):
    import json

    from safetensors.torch import save_file

    from skipcache.loading import config_of

    src = load_model("tiny", "none", seed=7)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config_of("tiny"), "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    lm = load_model(f"local-dir:{tmp_path}")
    assert lm.pretrained_label == "local" and len(lm.weights_hash) == 16
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, src.model.state_dict()[k]), k
    with pytest.raises(ModelError, match="local-dir not found"):
        load_model(f"local-dir:{tmp_path / 'missing'}")
