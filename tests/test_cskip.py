"""CSkip against closed forms, an empirical keep frequency, and an image-by-image reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from skipcache.cskip import (CSkipConfig, dynamic_rank, expected_kept, fixed_masks,
                             keep_probabilities, masked_cross_entropy, sample_keep_mask,
                             target_positions, union_and_mask)
from skipcache.errors import ConfigError


def random_ranks(B, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(M, generator=g) for _ in range(B)])  # (B, M)


def test_eq7_hand_computed():
    # M=10, r=0.5 -> top=5: ranks 0..4 certain; rank 5 is exp(0)=1 too (DESIGN.md taken literally)
    p = keep_probabilities(torch.arange(10)[None], CSkipConfig(r=0.5, lam=0.3))[0]
    expected = [1.0] * 6 + [math.exp(-0.3 * k) for k in (1, 2, 3, 4)]
    torch.testing.assert_close(p, torch.tensor(expected))


def test_eq7_non_integer_top_and_cap():
    # M=5, r=0.5 -> top=2.5: ranks 0,1,2 certain, rank 3 -> exp(-0.3*0.5)
    p = keep_probabilities(torch.arange(5)[None], CSkipConfig(r=0.5, lam=0.3))[0]
    torch.testing.assert_close(p[3], torch.tensor(math.exp(-0.15)))
    # cap: M=100, r=0.5 would give top=50; max_top=3 gives top=3
    p = keep_probabilities(torch.arange(100)[None], CSkipConfig(r=0.5, max_top=3))[0]
    assert (p[:4] == 1).all() and p[4] < 1
    torch.testing.assert_close(p[10], torch.tensor(math.exp(-0.3 * 7)))


def test_keep_probabilities_follow_rank_not_class():
    rank = random_ranks(3, 12)
    cfg = CSkipConfig(r=0.25, lam=0.5)
    p = keep_probabilities(rank, cfg)
    top = 0.25 * 12
    ref = torch.where(rank < top, 1.0, torch.exp(-0.5 * (rank.float() - top)))
    torch.testing.assert_close(p, ref)


def test_empirical_frequency_matches_p():
    M, draws = 20, 20000
    cfg = CSkipConfig(r=0.2, lam=0.3)
    rank = torch.arange(M).expand(draws, M)
    labels = torch.zeros(draws, dtype=torch.long)  # rank 0 is certain anyway
    keep = sample_keep_mask(rank, labels, cfg, torch.Generator().manual_seed(0))
    freq = keep.float().mean(0)
    p = keep_probabilities(rank[:1], cfg)[0]
    bound = 5 * torch.sqrt(p * (1 - p) / draws) + 1e-6
    assert ((freq - p).abs() <= bound).all()


def test_masks_are_resampled_each_call():
    rank, labels = random_ranks(8, 50), torch.zeros(8, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    a = sample_keep_mask(rank, labels, CSkipConfig(), g)
    b = sample_keep_mask(rank, labels, CSkipConfig(), g)
    assert not torch.equal(a, b)


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 6), M=st.integers(1, 60), seed=st.integers(0, 2**16),
       r=st.floats(0.01, 1.0), lam=st.floats(0.01, 5.0),
       variant=st.sampled_from(["eq7", "paper-code"]))
def test_true_class_always_kept(B, M, seed, r, lam, variant):
    rank = random_ranks(B, M, seed)
    labels = torch.randint(0, M, (B,), generator=torch.Generator().manual_seed(seed))
    cfg = CSkipConfig(r=r, lam=lam, variant=variant)
    keep = sample_keep_mask(rank, labels, cfg, torch.Generator().manual_seed(seed))
    assert keep[torch.arange(B), labels].all()
    p = keep_probabilities(rank, cfg)
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()


def test_disabled_keeps_all():
    cfg = CSkipConfig(enabled=False)
    keep = sample_keep_mask(random_ranks(4, 30), torch.zeros(4, dtype=torch.long), cfg)
    assert keep.all()
    assert expected_kept(30, cfg) == 30


def test_expected_kept():
    cfg = CSkipConfig(r=0.5, lam=0.3)
    ref = 6 + sum(math.exp(-0.3 * k) for k in (1, 2, 3, 4))
    assert expected_kept(10, cfg) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be in (0, 1], got 0; pass --r between 0 and 1"),
    (dict(r=1.5), "r must be in (0, 1], got 1.5"),
    (dict(lam=0), "lam must be > 0"),
    (dict(lam=float("nan")), "lam must be > 0"),
    (dict(max_top=0), "max_top must be an integer >= 1"),
    (dict(variant="topk"), "variant must be 'eq7' or 'paper-code'"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError) as err:
        CSkipConfig(**kwargs)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_union_mask_matches_per_image_reference():
    B, M, E = 5, 40, 8
    g = torch.Generator().manual_seed(1)
    rank, labels = random_ranks(B, M, 1), torch.randint(0, M, (B,), generator=g)
    keep = sample_keep_mask(rank, labels, CSkipConfig(r=0.1, lam=0.5), g)
    image = torch.randn(B, E, generator=g)
    text = torch.randn(M, E, generator=g, requires_grad=True)  # stands in for the text tower

    class_ids, mask = union_and_mask(keep)
    assert torch.equal(class_ids, keep.any(0).nonzero().flatten())
    assert torch.equal(class_ids, class_ids.sort().values)
    logits = image @ text[class_ids].t()  # (B, U): text tower runs once on the union
    loss = masked_cross_entropy(logits, mask, target_positions(class_ids, labels))

    # reference: each image alone, against only its own kept classes
    ref = []
    for b in range(B):
        own = keep[b].nonzero().flatten()
        target = (own == labels[b]).nonzero().item()
        ref.append(F.cross_entropy((image[b] @ text[own].t())[None], torch.tensor([target])))
    torch.testing.assert_close(loss, torch.stack(ref).mean())
    loss.backward()
    assert torch.isfinite(text.grad).all()
    dropped = ~keep.any(0)
    assert (text.grad[dropped] == 0).all()


def test_target_positions_rejects_missing_label():
    with pytest.raises(ValueError):
        target_positions(torch.tensor([1, 4, 7]), torch.tensor([4, 5]))


def test_dynamic_rank_matches_counting_reference():
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    protos = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    protos[7] = protos[3]  # a tie, broken by index
    rank = dynamic_rank(image, protos)
    sim = image @ protos.t()
    idx = torch.arange(30)
    # rank[b, j] = #classes strictly more similar + #equally similar with a smaller index
    ahead = (sim[:, None, :] > sim[:, :, None]) | (
        (sim[:, None, :] == sim[:, :, None]) & (idx[None, :] < idx[:, None]))
    torch.testing.assert_close(rank, ahead.sum(-1))
    assert (rank[:, 3] < rank[:, 7]).all()


@pytest.mark.parametrize("M, r, k", [(10, 0.5, 5), (11, 0.5, 6), (1000, 0.5, 50), (37, 0.3, 12)])
def test_paper_code_certain_count_and_tail(M, r, k):
    cfg = CSkipConfig(r=r, lam=0.3, variant="paper-code")
    assert k == min(math.ceil(r * M), 50)
    p = keep_probabilities(torch.arange(M)[None], cfg)[0]
    assert (p[:k] == 1).all()
    w = torch.exp(-torch.linspace(0, 5, M - k) / 0.3)
    torch.testing.assert_close(p[k:], (w - w.min()) / (w.max() - w.min()))
    assert p[k] == 1 and p[-1] == 0


def test_paper_code_single_tail_class_is_kept_not_nan():
    # M=3, r=0.5 -> k=2, one tail rank: the original gives NaN (0/0); we define p = 1
    p = keep_probabilities(torch.arange(3)[None], CSkipConfig(r=0.5, variant="paper-code"))
    assert torch.equal(p, torch.ones(1, 3))


def test_paper_code_masks_fixed_across_calls():
    N, M = 12, 30
    rank, labels = random_ranks(N, M, 3), torch.randint(0, M, (N,))
    cfg = CSkipConfig(variant="paper-code")
    masks = fixed_masks(rank, labels, cfg, torch.Generator().manual_seed(0))
    # drawn once: a batch looks its rows up, so an image sees the same subset every epoch
    assert masks.shape == (N, M) and masks[torch.tensor([3, 0])].shape == (2, M)
    again = fixed_masks(rank, labels, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    assert masks[torch.arange(N), labels].all()
