"""Loss functions: hand-computed values, TRL's sigmoid DPO loss, the anchor's zero region."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from foundation.train_config import ANCHOR_FORMS
from worker.training.loss import (
    BaseAnchor,
    LossResult,
    anchor_hinge,
    anchor_in_sigmoid_losses,
    bapo_loss,
    dpo_losses,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_bapo_hinge_matches_hand_computed_values() -> None:
    # pair 1: h_w=1, h_l=0, h_b=-2; pair 2: h_w=0, h_l=1, h_b=3; beta=0.5, lambda=0.5
    result = bapo_loss(_t(1, 0), _t(0, 1), _t(-2, 3), beta=0.5, anchor_weight=0.5)
    assert isinstance(result, LossResult)
    loss, m = result
    dpo1 = math.log(1 + math.exp(-0.5))  # -log sigmoid(0.5)
    dpo2 = math.log(1 + math.exp(0.5))  # -log sigmoid(-0.5)
    assert loss.item() == pytest.approx(((dpo1 + 0.5 * 2) + (dpo2 + 0)) / 2)
    assert m["dpo_loss"].item() == pytest.approx((dpo1 + dpo2) / 2)
    assert m["anchor_loss"].item() == pytest.approx(1.0)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)
    assert m["reward_margin"].item() == pytest.approx(0.0)
    assert m["anchor_logratio"].item() == pytest.approx(0.5)
    assert m["anchor_below_frac"].item() == pytest.approx(0.5)


def test_sigmoid_form_matches_hand_computed_value() -> None:
    # -log sigmoid(beta*(h_w-h_l) - beta*lambda*max(0,-h_b)) = -log sigmoid(0.1*2 - 0.1*2*1.5)
    loss, m = bapo_loss(_t(2), _t(0), _t(-1.5), beta=0.1, anchor_weight=2.0, anchor_form="sigmoid")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-(0.2 - 0.3))))
    assert m["dpo_loss"].item() == pytest.approx(math.log(1 + math.exp(-0.2)))
    assert m["anchor_loss"].item() == pytest.approx(1.5)


def trl_sigmoid_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """TRL 1.16 DPOTrainer._compute_loss, loss_type="sigmoid", f_divergence "reverse_kl".

    trl/trainer/dpo_trainer.py: chosen_logratios = chosen_logps - ref_chosen_logps (same for
    rejected); delta_score = chosen_scores - rejected_scores;
    per_sequence_loss = -F.logsigmoid(self.beta * delta_score). TRL has no standalone function.
    """
    delta_score = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * delta_score)


def test_reference_formula_is_still_trls() -> None:
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed")
    source = (Path(spec.origin).parent / "trainer" / "dpo_trainer.py").read_text()
    assert "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)" in source
    assert "chosen_logratios = chosen_logps - ref_chosen_logps" in source


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_dpo_term_equals_trl_sigmoid_loss(beta: float) -> None:
    gen = torch.Generator().manual_seed(int(beta * 100))
    logps = [-torch.rand(64, generator=gen, dtype=torch.float64) * 50 for _ in range(4)]
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
    expected = trl_sigmoid_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    ours = dpo_losses(policy_chosen - ref_chosen, policy_rejected - ref_rejected, beta)
    torch.testing.assert_close(ours, expected)
    loss, metrics = bapo_loss(
        policy_chosen - ref_chosen, policy_rejected - ref_rejected, None, beta=beta, anchor_weight=0
    )
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(metrics["anchor_loss"], torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("form", ["hinge", "sigmoid"])
def test_anchor_and_its_gradient_vanish_when_base_logprob_not_below_reference(form: str) -> None:
    h_w, h_l = _t(0.3, -1.0, 2.0), _t(0.1, 0.5, -1.0)
    h_b = _t(0.0, 0.7, 5.0).requires_grad_()  # policy's base log-prob at or above the reference
    loss, metrics = bapo_loss(h_w, h_l, h_b, beta=0.1, anchor_weight=3.0, anchor_form=form)
    loss.backward()
    assert metrics["anchor_loss"].item() == 0.0
    assert loss.item() == pytest.approx(dpo_losses(h_w, h_l, 0.1).mean().item())
    assert h_b.grad is not None and torch.all(h_b.grad == 0)


def test_anchor_gradient_pushes_base_logprob_up_when_below_reference() -> None:
    h_b = _t(-1.0, 2.0).requires_grad_()
    loss, _ = bapo_loss(_t(0, 0), _t(0, 0), h_b, beta=0.1, anchor_weight=0.5)
    loss.backward()
    assert h_b.grad is not None
    torch.testing.assert_close(h_b.grad, _t(-0.25, 0.0))  # d/dh_b mean(λ·max(0,−h_b)) = −λ/B


def test_anchor_pieces() -> None:
    torch.testing.assert_close(anchor_hinge(_t(-2, 0, 3)), _t(2, 0, 0))
    plain = dpo_losses(_t(1), _t(0), 0.1)
    torch.testing.assert_close(anchor_in_sigmoid_losses(_t(1), _t(0), _t(4), 0.1, 9.0), plain)


def test_dpo_without_base_needs_zero_weight_and_form_is_checked() -> None:
    with pytest.raises(ValueError, match="h_base"):
        bapo_loss(_t(1), _t(0), None, beta=0.1, anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_form"):
        bapo_loss(_t(1), _t(0), _t(0), beta=0.1, anchor_weight=1.0, anchor_form="cubic")
    _, metrics = bapo_loss(_t(1), _t(0), None, beta=0.1, anchor_weight=0.0)
    assert "anchor_logratio" not in metrics


def _anchor(h: tuple[float, ...], n: tuple[float, ...], ref: tuple[float, ...]) -> BaseAnchor:
    return BaseAnchor(_t(*h), _t(*n), _t(*ref))


def test_per_token_hinge_divides_by_the_base_answer_length() -> None:
    anchor = _anchor((-8.0, 4.0), (4.0, 2.0), (-20.0, -10.0))
    loss, m = bapo_loss(
        _t(0, 0), _t(0, 0), anchor, beta=0.1, anchor_weight=3.0, anchor_form="hinge_per_token"
    )
    # per pair: log 2 + 3 * max(0, 8/4) and log 2 + 0
    assert loss.item() == pytest.approx(math.log(2) + 3.0 * 2.0 / 2)
    assert m["anchor_loss"].item() == pytest.approx(1.0)
    assert m["anchor_logratio"].item() == pytest.approx(-2.0)


def test_tolerance_hinge_is_flat_inside_the_tolerance() -> None:
    h_b = _t(-3.0, -7.0).requires_grad_()
    loss, m = bapo_loss(
        _t(0, 0), _t(0, 0), h_b, beta=0.1, anchor_weight=1.0,
        anchor_form="hinge_tolerance", anchor_tolerance=5.0,
    )  # fmt: skip
    loss.backward()
    assert m["anchor_loss"].item() == pytest.approx((0 + 2.0) / 2)
    assert h_b.grad is not None and h_b.grad.tolist() == [0.0, -0.5]  # only beyond δ pushes


def test_replay_is_the_per_token_nll_of_the_base_answer_and_keeps_pulling() -> None:
    h_b = _t(2.0, -4.0).requires_grad_()
    anchor = BaseAnchor(h_b, _t(4.0, 8.0), _t(-12.0, -20.0))
    loss, m = bapo_loss(
        _t(0, 0), _t(0, 0), anchor, beta=0.1, anchor_weight=1.0, anchor_form="replay"
    )
    loss.backward()
    # NLL per token under the policy: -(r_b + h_b) / n_b = 10/4 and 24/8
    assert m["anchor_loss"].item() == pytest.approx((2.5 + 3.0) / 2)
    assert loss.item() == pytest.approx(math.log(2) + 2.75)
    assert h_b.grad is not None
    assert h_b.grad.tolist() == pytest.approx([-1 / 8, -1 / 16])  # nonzero even where h_b > 0


def test_per_token_forms_need_lengths_and_reference() -> None:
    with pytest.raises(ValueError, match="needs the base answer"):
        bapo_loss(_t(1), _t(0), _t(-1), beta=0.1, anchor_weight=1.0, anchor_form="replay")
    assert set(ANCHOR_FORMS) >= {"hinge", "hinge_per_token", "hinge_tolerance", "replay"}
