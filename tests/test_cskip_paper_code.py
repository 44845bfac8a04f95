"""The paper-code CSkip variant against a transcription of the authors' class selection.

`authors_select` below restates, step by step, what the authors' SkipTuning trainer does in its
`select_classes` (read from their published code): it is the independent reference. Fed the same
image features, prototypes, labels and the same M uniform numbers for the once-per-run mask,
`BatchSubset` must keep the same classes and train each image towards the same class.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from skipcache.cskip import BatchSubset, CSkipConfig, positions_of


def authors_select(feats, prototypes, labels, *, r, lam, max_top, uniforms, mask=None):
    """(kept class ids in id order, each image's target class id, the position mask)."""
    M = prototypes.shape[0]
    tops = math.ceil(r * M) if r <= 1.0 else math.ceil(min(r, M))
    tops = min(tops, max_top)
    if r == 1.0 or tops == M:
        return torch.arange(M), labels.clone(), None
    sim = F.normalize(feats, dim=-1) @ prototypes.T  # (B, M)
    sim[torch.arange(len(labels)), labels] = 1e4  # each image's own label first
    order = sim.max(dim=0).values.sort(descending=True).indices
    if mask is None:  # drawn once, at the first batch, and kept for the run
        x = torch.linspace(0.0, 5.0, M - tops)
        pdf = torch.exp(-x / lam) / lam  # the exponential density with scale lam
        pdf = (pdf - pdf.min()) / (pdf.max() - pdf.min())  # 0/0 = nan for a single tail position
        ratios = torch.cat([torch.ones(tops), pdf])
        mask = uniforms < ratios
    kept = order[mask].sort().values
    target_pos = F.one_hot(labels, M)[:, kept].argmax(dim=1)  # a dropped label points at position 0
    return kept, kept[target_pos], mask


CASES = {
    "M=10 r=0.5": dict(M=10, r=0.5, max_top=50, B=4),
    "M=100 capped at 50": dict(M=100, r=0.6, max_top=50, B=4),
    "M=1000": dict(M=1000, r=0.5, max_top=50, B=4),
    "r>1 is a count": dict(M=40, r=7, max_top=50, B=4),
    "cap 5": dict(M=60, r=0.5, max_top=5, B=4),
    "one tail position (0/0)": dict(M=3, r=0.5, max_top=50, B=2),
    "r=1 keeps all": dict(M=20, r=1.0, max_top=5, B=4),
    "more labels than kept slots": dict(M=8, r=0.25, max_top=50, B=6),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_batch_subset_keeps_what_the_authors_code_keeps(case, lam):
    M, r, max_top, B = case["M"], case["r"], case["max_top"], case["B"]
    g = torch.Generator().manual_seed(M * 7 + B)
    prototypes = F.normalize(torch.randn(M, 16, generator=g), dim=-1)
    seed = 11
    cfg = CSkipConfig(r=r, lam=lam, max_top=max_top, variant="paper-code")
    ours = BatchSubset(M, cfg, batch_size=B)
    ours.fix_draw(torch.Generator().manual_seed(seed))
    uniforms = torch.rand(M, generator=torch.Generator().manual_seed(seed))
    mask = None
    for _ in range(6):  # several batches share the one mask
        feats = torch.randn(B, 16, generator=g)
        labels = torch.randint(M, (B,), generator=g)
        kept, target, mask = authors_select(feats, prototypes, labels, r=r, lam=lam, max_top=max_top,
                                            uniforms=uniforms, mask=mask)
        score = F.normalize(feats, dim=-1) @ prototypes.T
        class_ids, keep = ours.sample(score, labels, None)
        assert class_ids[keep].tolist() == kept.tolist()
        assert class_ids[positions_of(labels, class_ids, keep)].tolist() == target.tolist()


def test_a_single_tail_position_is_never_kept():
    cfg = CSkipConfig(r=0.5, lam=0.3, variant="paper-code")
    for seed in range(20):
        subset = BatchSubset(3, cfg, batch_size=1)
        subset.fix_draw(torch.Generator().manual_seed(seed))
        class_ids, keep = subset.sample(torch.tensor([[0.9, 0.5, 0.1]]), torch.tensor([0]), None)
        assert sorted(class_ids[keep].tolist()) == [0, 1]


def test_r_above_one_is_refused_for_eq7_but_a_count_for_paper_code():
    from skipcache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"r must be in \(0, 1\]"):
        CSkipConfig(r=7)
    assert BatchSubset(40, CSkipConfig(r=7, variant="paper-code"), batch_size=1).certain >= 7
