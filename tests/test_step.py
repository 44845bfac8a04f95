"""The tune step: the batch-shared CSkip subset against Eq. 7 in closed form, the step's loss
against a hand-built reference, and the fused optimiser against SGD's update rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from skipcache.cskip import BatchSubset, CSkipConfig, positions_of
from skipcache.loading import load_model
from skipcache.model import split_model
from skipcache.placement import Placement
from skipcache.step import TuneStep, make_optimizer

CPU = Placement(torch.device("cpu"))


def eq7(o: int, M: int, r: float, lam: float) -> float:
    """Paper Eq. 7, written out independently: 1 below r*M, exp(-lam * (o - r*M)) from there."""
    top = r * M
    return 1.0 if o < top else math.exp(-lam * (o - top))


def test_batch_subset_keeps_each_rank_position_with_eq7_probability():
    M, r, lam = 40, 0.25, 0.3
    subset = BatchSubset(M, CSkipConfig(r=r, lam=lam), batch_size=1)
    assert subset.certain == 11  # ranks 0..10: exp(0) = 1 at o = r*M = 10
    score = -torch.arange(M, dtype=torch.float32).unsqueeze(0)  # class j has rank j
    labels = torch.tensor([0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(M)
    for _ in range(n):
        class_ids, keep = subset.sample(score, labels, g)
        assert class_ids.shape == keep.shape == (subset.size,)
        counts[class_ids[keep]] += 1
    freq = counts / n
    expected = torch.tensor([eq7(o, M, r, lam) for o in range(M)])
    se = torch.sqrt(expected * (1 - expected) / n)
    # every rank position, also beyond the slot count: a slot takes the next drawn position
    assert subset.size < M
    assert torch.all((freq - expected).abs() <= 5 * se + 1e-9)
    assert subset.expected_size() == pytest.approx(float(expected.sum()), rel=1e-5)


def test_batch_subset_orders_by_best_image_and_puts_true_classes_first():
    M = 10
    subset = BatchSubset(M, CSkipConfig(r=0.3, lam=5.0), batch_size=2)  # certain = 4, a steep tail
    score = torch.full((2, M), -1.0)
    score[0, 7], score[1, 3], score[0, 5] = 0.9, 0.8, 0.7  # best-to-any-image order: 7, 3, 5
    labels = torch.tensor([1, 9])
    class_ids, keep = subset.sample(score, labels, torch.Generator().manual_seed(0))
    certain = class_ids[: subset.certain].tolist()
    assert set(certain[:2]) == {1, 9}  # the true classes take the first positions
    assert certain[2:] == [7, 3]
    assert keep[: subset.certain].all()
    assert positions_of(labels, class_ids).tolist() == [certain.index(1), certain.index(9)]


def test_paper_code_batch_subset_reuses_one_draw():
    subset = BatchSubset(200, CSkipConfig(variant="paper-code"), batch_size=4)
    subset.fix_draw(torch.Generator().manual_seed(1))
    score = torch.randn(4, 200, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])
    kept = {int(subset.sample(score, labels, None)[1].sum()) for _ in range(5)}
    assert len(kept) == 1 and kept.pop() == subset.expected_size()


@pytest.fixture
def deep_and_text():
    lm = load_model("tiny", "none", seed=3)
    _, deep = split_model(lm.model, 2, keep_shallow=False)
    g = torch.Generator().manual_seed(0)
    M, Lt = 9, 6
    dt = deep.text.ln_final.normalized_shape[0]
    text = {"tokens": torch.randn(M, Lt, dt, generator=g), "eot": torch.randint(1, Lt, (M,), generator=g),
            "prototypes": F.normalize(torch.randn(M, deep.vision.proj.shape[1], generator=g), dim=-1)}
    return deep, text


def test_step_loss_is_cross_entropy_over_the_batch_subset(deep_and_text):
    deep, text = deep_and_text
    B, M = 4, 9
    lv, dv = 5, deep.vision.ln_post.normalized_shape[0]
    g = torch.Generator().manual_seed(1)
    batch = {"vision": torch.randn(B, lv, dv, generator=g), "labels": torch.tensor([0, 4, 4, 8]),
             "zeroshot_rank": torch.stack([torch.randperm(M, generator=g) for _ in range(B)])}
    skip = CSkipConfig(r=0.3, lam=0.5)
    ref_subset = BatchSubset(M, skip, B)
    class_ids, keep = ref_subset.sample(-batch["zeroshot_rank"].float(), batch["labels"], torch.Generator().manual_seed(7))
    with torch.no_grad():  # the reference, before the step changes the weights
        image = F.normalize(deep.vision(batch["vision"]), dim=-1)
        feats = F.normalize(deep.text(text["tokens"][class_ids], text["eot"][class_ids]), dim=-1)
        logits = deep.logit_scale * image @ feats.T
        logits[:, ~keep] = float("-inf")
        target = torch.tensor([class_ids.tolist().index(int(y)) for y in batch["labels"]])
        expected = F.cross_entropy(logits, target)
    opt = make_optimizer(deep.layer_groups(), {"vision": 0.0, "text": 0.0}, momentum=0.9, weight_decay=0.0, placement=CPU)
    step = TuneStep(deep, text, skip, rank="zeroshot", batch_size=B, optimizer=opt, placement=CPU,
                    generator=torch.Generator().manual_seed(7))
    stats = step(batch)
    loss_sum, correct, kept, classes, images = stats.tolist()
    assert loss_sum / images == pytest.approx(float(expected), rel=1e-5)
    assert classes == ref_subset.size and kept == B * int(keep.sum())
    assert correct == int((logits.argmax(1) == target).sum())


def test_fused_sgd_follows_the_update_rule():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = make_optimizer({"text": [w]}, {"text": 0.1}, momentum=0.9, weight_decay=0.01, placement=CPU)
    w0 = w.detach().clone()
    grads = [torch.tensor([0.5, 0.5, -1.0]), torch.tensor([1.0, 0.0, 2.0])]
    buf = None
    expected = w0.clone()
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        d = grad + 0.01 * expected  # weight decay folded into the gradient
        buf = d if buf is None else 0.9 * buf + d  # momentum buffer (dampening 0)
        expected = expected - 0.1 * buf
    assert torch.allclose(w.detach(), expected, atol=1e-6)
