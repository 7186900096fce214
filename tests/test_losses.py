import math

import pytest
import torch

from geoseg.errors import ConfigError
from geoseg.losses import make_loss, parse_loss

# two pixels, two classes: pixel 0 is class 0, pixel 1 is class 1, pixel 2 is ignored
LOGITS = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # (1, 2, 1, 3)
TARGET = torch.tensor([[[0, 1, 255]]])
P0 = math.exp(2) / (math.exp(2) + 1)  # softmax probability of class 0 at pixel 0
P1 = math.exp(1) / (math.exp(1) + 1)  # ... of class 1 at pixel 1


def test_cross_entropy_by_hand():
    expected = -(math.log(P0) + math.log(P1)) / 2
    assert make_loss("ce")(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    # class weights: a weighted mean
    w = (1.0, 3.0)
    weighted = -(1 * math.log(P0) + 3 * math.log(P1)) / 4
    assert make_loss("ce", w)(LOGITS, TARGET).item() == pytest.approx(weighted, rel=1e-6)
    # label smoothing 0.2 over 2 classes: target 0.9 / 0.1
    smooth = (
        -(0.9 * math.log(P0) + 0.1 * math.log(1 - P0) + 0.9 * math.log(P1) + 0.1 * math.log(1 - P1))
        / 2
    )
    assert make_loss("ce", label_smoothing=0.2)(LOGITS, TARGET).item() == pytest.approx(
        smooth, rel=1e-6
    )


def test_dice_by_hand():
    # class 0: probs (P0, 1-P1), truth (1, 0); class 1: probs (1-P0, P1), truth (0, 1); eps = 1
    d0 = (2 * P0 + 1) / (P0 + (1 - P1) + 1 + 1)
    d1 = (2 * P1 + 1) / ((1 - P0) + P1 + 1 + 1)
    assert make_loss("dice")(LOGITS, TARGET).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_focal_by_hand():
    f = lambda p: -((1 - p) ** 2) * math.log(p)  # noqa: E731
    assert make_loss("focal")(LOGITS, TARGET).item() == pytest.approx((f(P0) + f(P1)) / 2, rel=1e-6)


def test_lovasz_by_hand():
    # class 0: fg (1, 0), p (P0, 1-P1): errors (1-P0, 1-P1); the larger one (pixel 1, background)
    # comes first with Jaccard step 1/2, then pixel 0 with 1/2. Class 1 is the mirror image.
    e0, e1 = 1 - P0, 1 - P1
    class0 = 0.5 * max(e0, e1) + 0.5 * min(e0, e1)
    # class 1: fg (0, 1), errors (1-P0, 1-P1); the larger, 1-P1, is pixel 1 (foreground): the
    # Jaccard loss jumps to 1 there, then the background pixel adds nothing
    assert e1 > e0
    class1 = e1
    assert make_loss("lovasz")(LOGITS, TARGET).item() == pytest.approx(
        (class0 + class1) / 2, rel=1e-6
    )


def test_lovasz_two_pixel_example_from_the_paper_definition():
    # class c: fg (1, 0), p_c (0.8, 0.3) -> errors (0.2, 0.3); sorted: 0.3 (bg) then 0.2 (fg);
    # Jaccard after each: 1 - 1/2 = 0.5, then 1 - 0/2 = 1 -> steps 0.5, 0.5 -> 0.25
    probs = torch.tensor([[0.8, 0.3], [0.2, 0.7]])  # (classes, pixels)
    logits = probs.log().reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    # class 1: fg (0, 1), errors (0.2, 0.3); sorted 0.3 (fg) then 0.2 (bg): steps 1, 0 -> 0.3
    assert make_loss("lovasz")(logits, target).item() == pytest.approx((0.25 + 0.3) / 2, rel=1e-5)


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz"])
def test_ignored_pixels_do_not_count(name):
    loss = make_loss(name)
    other = LOGITS.clone()
    other[..., 2] = torch.tensor([-50.0, 50.0]).reshape(1, 2, 1)  # change only the ignored pixel
    assert loss(LOGITS, TARGET).item() == pytest.approx(loss(other, TARGET).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz", "ce+dice"])
def test_all_ignored_batch_is_finite_with_zero_gradient(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    value = make_loss(name)(logits, torch.full((2, 4, 4), 255))
    value.backward()
    assert torch.isfinite(value) and value.item() == 0.0
    assert logits.grad is not None and (logits.grad == 0).all()


def test_combinations_are_weighted_sums():
    a, b = make_loss("ce")(LOGITS, TARGET), make_loss("dice")(LOGITS, TARGET)
    assert make_loss("0.5*ce+2*dice")(LOGITS, TARGET).item() == pytest.approx(
        0.5 * a.item() + 2 * b.item(), rel=1e-6
    )
    assert parse_loss("ce + 0.25*lovasz") == [(1.0, "ce"), (0.25, "lovasz")]
    with pytest.raises(ConfigError, match="ce, dice, focal, lovasz"):
        parse_loss("ce+tversky")
