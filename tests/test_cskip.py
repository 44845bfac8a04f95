"""CSkip against hand-computed numbers, an empirical keep frequency, and an image-by-image reference.

The expected probabilities are literals worked out by hand from the definitions in DESIGN.md
("CSkip details") and skipcache/cskip.py's docstring, never re-derived with the code's formula:

  Eq. 7, M = 10, r = 0.5, lambda = 0.3: top = 5; ranks 0..5 certain (rank 5 is exp(0)), then
      exp(-0.3) = 0.7408182207, exp(-0.6) = 0.5488116361, exp(-0.9) = 0.4065696597,
      exp(-1.2) = 0.3011942119 for ranks 6..9.
  paper-code, M = 10, r = 0.5, lambda = 0.3: k = min(ceil(5), 50) = 5 certain; the n = 5 tail
      ranks take x = 0, 1.25, 2.5, 3.75, 5 -> w = exp(-x / 0.3) = 1, 0.0155038536, 2.40369e-4,
      3.72665e-6, 5.77775e-8, min-max normalized: 1, 0.0155037967, 2.403117e-4, 3.668876e-6, 0.
"""


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


# Keep probability by rank 0..9, worked out by hand (module docstring).
EQ7_M10 = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7408182207, 0.5488116361, 0.4065696597, 0.3011942119]
PAPER_CODE_M10 = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0155037967, 2.403117e-4, 3.668876e-6, 0.0]
# paper-code with lambda = 1: w = exp(-x) at x = 0, 1.25, 2.5, 3.75, 5 = 1, 0.2865048, 0.0820850,
# 0.0235177, 0.0067379; min-max normalized:
PAPER_CODE_M10_LAM1 = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2816646916, 0.0758581800, 0.0168936272, 0.0]


def assert_probabilities(p, expected):
    torch.testing.assert_close(p, torch.tensor(expected, dtype=p.dtype), rtol=1e-5, atol=1e-8)


def test_eq7_hand_computed():
    # M=10, r=0.5 -> top=5: ranks 0..4 certain; rank 5 is exp(0)=1 too (DESIGN.md taken literally)
    p = keep_probabilities(torch.arange(10)[None], CSkipConfig(r=0.5, lam=0.3))[0]
    assert_probabilities(p, EQ7_M10)


def test_eq7_non_integer_top_and_cap():
    # M=5, r=0.5 -> top=2.5: ranks 0,1,2 certain; rank 3 -> exp(-0.3*0.5), rank 4 -> exp(-0.3*1.5)
    p = keep_probabilities(torch.arange(5)[None], CSkipConfig(r=0.5, lam=0.3))[0]
    assert_probabilities(p, [1.0, 1.0, 1.0, 0.8607079764, 0.6376281516])
    # cap: M=100, r=0.5 would give top=50; max_top=3 gives top=3: ranks 0..3 certain,
    # rank 4 -> exp(-0.3*1), rank 10 -> exp(-0.3*7)
    p = keep_probabilities(torch.arange(100)[None], CSkipConfig(r=0.5, max_top=3))[0]
    assert (p[:4] == 1).all()
    assert_probabilities(p[[4, 10]], [0.7408182207, 0.1224564283])


def test_keep_probabilities_follow_rank_not_class():
    # M=4, r=0.25, lam=0.5: top=1; by rank 0..3: 1, exp(0)=1, exp(-0.5), exp(-1)
    rank = torch.tensor([[2, 0, 3, 1],
                         [1, 3, 0, 2]])
    p = keep_probabilities(rank, CSkipConfig(r=0.25, lam=0.5))
    assert_probabilities(p, [[0.6065306597, 1.0, 0.3678794412, 1.0],
                             [1.0, 0.3678794412, 1.0, 0.6065306597]])


def _frequency_by_rank(keep, rank):
    """How often the class at each rank position was kept: (M,), from masks (N, M) over classes."""
    return keep.gather(1, rank.argsort(1)).float().mean(0)  # column k: the class whose rank is k


@pytest.mark.parametrize("variant, lam, expected", [("eq7", 0.3, EQ7_M10), ("paper-code", 1.0, PAPER_CODE_M10_LAM1)])
def test_empirical_frequency_matches_hand_computed_p(variant, lam, expected):
    M, draws = 10, 20000
    rank = random_ranks(draws, M, seed=4)  # classes in a different order for every image
    labels = rank.argmin(1)  # the top-ranked class: certain anyway, so forcing it changes nothing
    cfg = CSkipConfig(r=0.5, lam=lam, variant=variant)
    g = torch.Generator().manual_seed(0)
    keep = fixed_masks(rank, labels, cfg, g) if variant == "paper-code" else sample_keep_mask(rank, labels, cfg, g)
    freq = _frequency_by_rank(keep, rank)
    p = torch.tensor(expected)
    bound = 5 * torch.sqrt(p * (1 - p) / draws) + 1e-6  # 5 standard errors of a Bernoulli mean
    assert ((freq - p).abs() <= bound).all(), (freq, p)


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
    # the sums of EQ7_M10 and PAPER_CODE_M10
    assert expected_kept(10, CSkipConfig(r=0.5, lam=0.3)) == pytest.approx(7.9973937284, rel=1e-6)
    assert expected_kept(10, CSkipConfig(r=0.5, lam=0.3, variant="paper-code")) == pytest.approx(6.0157477773, rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "cskip.r must be in (0, 1], got 0; e.g. 0.5"),
    (dict(r=1.5), "cskip.r must be in (0, 1], got 1.5"),
    (dict(lam=0), "cskip.lam must be > 0"),
    (dict(lam=float("nan")), "cskip.lam must be > 0"),
    (dict(max_top=0), "cskip.max_top must be an integer >= 1"),
    (dict(variant="topk"), "cskip.variant must be 'eq7' or 'paper-code'"),
    (dict(subset="all"), "cskip.subset must be 'batch' or 'image'"),
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


def test_paper_code_hand_computed():
    p = keep_probabilities(torch.arange(10)[None], CSkipConfig(r=0.5, lam=0.3, variant="paper-code"))[0]
    assert_probabilities(p, PAPER_CODE_M10)


# (M, r, k = min(ceil(r*M), 50) by hand, {tail position i: p}); the tail has n = M - k ranks at
# x_i = 5 i / (n - 1), p_i = (exp(-x_i/0.3) - exp(-5/0.3)) / (1 - exp(-5/0.3)), worked out by hand.
PAPER_CODE_CASES = [
    (11, 0.5, 6, {0: 1.0, 1: 0.0155037967, 2: 2.403117e-4, 4: 0.0}),  # ceil(5.5) = 6; same 5-rank tail
    (37, 0.3, 12, {0: 1.0, 1: 0.4993517597, 2: 0.2493521654, 3: 0.1245144209, 24: 0.0}),  # ceil(11.1); x step 5/24
    (1000, 0.5, 50, {0: 1.0, 1: 0.9825909718, 57: 0.3674919592, 100: 0.1726938492, 949: 0.0}),  # capped at 50
]


@pytest.mark.parametrize("M, r, k, tail", PAPER_CODE_CASES, ids=[f"M{c[0]}" for c in PAPER_CODE_CASES])
def test_paper_code_certain_count_and_tail(M, r, k, tail):
    p = keep_probabilities(torch.arange(M)[None], CSkipConfig(r=r, lam=0.3, variant="paper-code"))[0]
    assert (p[:k] == 1).all() and len(p) == M
    positions = sorted(tail)
    assert_probabilities(p[[k + i for i in positions]], [tail[i] for i in positions])


def test_paper_code_single_tail_class_is_never_kept_as_in_the_authors_code():
    # M=3, r=0.5 -> k=2, one tail rank: their min-max normalisation is 0/0 = NaN, rand < NaN is False
    p = keep_probabilities(torch.arange(3)[None], CSkipConfig(r=0.5, variant="paper-code"))
    assert p.tolist() == [[1.0, 1.0, 0.0]]


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
