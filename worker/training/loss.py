"""BAPO and DPO losses as small pure functions (tensors in, loss + metrics out; no I/O).

Notation, per pair in a batch of B: log-ratio h(y) = log πθ(y|x) − log πref(y|x) with sequence
log-probs summed over response tokens; y_w chosen, y_l rejected, y_b the base model's own response
(n_b tokens, reference log-prob r_b = log πref(y_b|x)); β the DPO temperature, λ the anchor weight.

Every objective is  L = mean_B( L_DPO + λ · A(h_b) ), with the anchor A one of (`anchor_form`):

    hinge            A = max(0, −h_b)         summed over y_b's tokens (the paper's form)
    hinge_per_token  A = max(0, −h_b / n_b)   the same hinge, per token of y_b
    hinge_tolerance  A = max(0, −h_b − δ)     free drift of δ nats before it pushes back
    replay           A = −(r_b + h_b) / n_b   per-token NLL of y_b: DPO + replay (no hinge)

and `sigmoid` (DPOP-style, the anchor inside the DPO sigmoid):
    L = mean_B( −log σ(β (h_w − h_l) − β λ max(0, −h_b)) ).

Scale: L_DPO's gradient per response token is at most β·σ ≤ β (0.1 by default), while the summed
hinge's is λ per token of y_b; at λ = 1 the summed hinge outweighs DPO ~10× and acts almost as a
hard constraint. The per-token forms divide by n_b (≈ 64), which is why their useful λ is larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from foundation.train_config import ANCHOR_FORMS

Metrics = dict[str, torch.Tensor]


class LossResult(NamedTuple):
    """A batch's loss (scalar, with grad) and its metrics (detached scalars)."""

    loss: torch.Tensor
    metrics: Metrics


@dataclass(frozen=True)
class BaseAnchor:
    """What the anchor needs per pair: h_b [B], and for the per-token forms n_b and r_b [B]."""

    logratio: torch.Tensor  # h_b = log πθ(y_b|x) − log πref(y_b|x)
    num_tokens: torch.Tensor | None = None  # n_b, tokens of y_b (float)
    ref_logp: torch.Tensor | None = None  # r_b = log πref(y_b|x)

    def per_token(self) -> torch.Tensor:
        """h_b / n_b."""
        return self.logratio / _required(self.num_tokens, "num_tokens")


def _required(value: torch.Tensor | None, name: str) -> torch.Tensor:
    """The tensor, or a clear error when an anchor form needs it and it is missing."""
    if value is None:
        raise ValueError(f"this anchor form needs the base answer's {name}")
    return value


def dpo_losses(h_chosen: torch.Tensor, h_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss  L_DPO = −log σ(β (h_w − h_l)).  [B], [B] → [B]."""
    return -F.logsigmoid(beta * (h_chosen - h_rejected))


def anchor_hinge(h_base: torch.Tensor) -> torch.Tensor:
    """Per-pair base anchor  L_anchor = max(0, −h_b).  [B] → [B]; zero (and flat) when h_b ≥ 0."""
    return torch.relu(-h_base)  # relu: gradient exactly 0 at h_b = 0 (clamp would pass it)


def anchor_hinge_per_token(anchor: BaseAnchor) -> torch.Tensor:
    """Length-normalised hinge  max(0, −h_b / n_b).  [B] → [B]."""
    return torch.relu(-anchor.per_token())


def anchor_hinge_tolerance(h_base: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Hinge with a tolerance of δ nats  max(0, −h_b − δ).  [B] → [B]."""
    return torch.relu(-h_base - tolerance)


def anchor_replay(anchor: BaseAnchor) -> torch.Tensor:
    """Per-token NLL of the base answer under the policy  −(r_b + h_b) / n_b.  [B] → [B].

    Its gradient is −∇h_b / n_b: unlike the hinges it keeps pulling y_b up when h_b > 0.
    """
    ref = _required(anchor.ref_logp, "ref_logp")
    return -(ref + anchor.logratio) / _required(anchor.num_tokens, "num_tokens")


def anchor_losses(anchor: BaseAnchor, form: str, tolerance: float = 0.0) -> torch.Tensor:
    """The per-pair anchor term A of `form` (module docstring).  [B] → [B]."""
    if form in ("hinge", "sigmoid"):
        return anchor_hinge(anchor.logratio)
    if form == "hinge_per_token":
        return anchor_hinge_per_token(anchor)
    if form == "hinge_tolerance":
        return anchor_hinge_tolerance(anchor.logratio, tolerance)
    if form == "replay":
        return anchor_replay(anchor)
    raise ValueError(f"unknown anchor_form {form!r}")


def anchor_in_sigmoid_losses(
    h_chosen: torch.Tensor,
    h_rejected: torch.Tensor,
    h_base: torch.Tensor,
    beta: float,
    anchor_weight: float,
) -> torch.Tensor:
    """Per-pair DPOP-style loss  −log σ(β (h_w − h_l) − β λ max(0, −h_b)).  [B]×3 → [B]."""
    penalty = beta * anchor_weight * anchor_hinge(h_base)
    return -F.logsigmoid(beta * (h_chosen - h_rejected) - penalty)


def preference_metrics(h_chosen: torch.Tensor, h_rejected: torch.Tensor, beta: float) -> Metrics:
    """reward_accuracy = mean[h_w > h_l], reward_margin = mean β(h_w − h_l).  [B]×2 → scalars."""
    margin = (beta * (h_chosen - h_rejected)).detach()
    return {"reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean()}


def anchor_metrics(h_base: torch.Tensor) -> Metrics:
    """anchor_logratio = mean h_b, anchor_below_frac = mean[h_b < 0].  [B] → scalars."""
    h = h_base.detach()
    return {"anchor_logratio": h.mean(), "anchor_below_frac": (h < 0).float().mean()}


def bapo_loss(
    h_chosen: torch.Tensor,
    h_rejected: torch.Tensor,
    h_base: torch.Tensor | BaseAnchor | None,
    *,
    beta: float,
    anchor_weight: float,
    anchor_form: str = "hinge",
    anchor_tolerance: float = 0.0,
) -> LossResult:
    """Batch loss and metrics; h_* are [B] log-ratios, h_base may be None when λ = 0 (DPO).

    L = mean_B( −log σ(β (h_w − h_l)) + λ A ), A per `anchor_form` (module docstring); `sigmoid`
    puts the hinge inside the sigmoid. h_base is a BaseAnchor (or a bare h_b tensor for the forms
    that need nothing else). Returns a LossResult (scalar loss with grad; metrics: loss,
    dpo_loss, anchor_loss, reward_accuracy, reward_margin and, with h_base, anchor_logratio,
    anchor_below_frac).
    """
    dpo = dpo_losses(h_chosen, h_rejected, beta)
    if anchor_form not in ANCHOR_FORMS:
        raise ValueError(f"unknown anchor_form {anchor_form!r}")
    if h_base is None:
        if anchor_weight != 0:
            raise ValueError("h_base is required when anchor_weight != 0")
        anchor, per_pair = dpo.new_zeros(dpo.shape), dpo
    else:
        base = h_base if isinstance(h_base, BaseAnchor) else BaseAnchor(h_base)
        anchor = anchor_losses(base, anchor_form, anchor_tolerance)
        if anchor_form == "sigmoid":
            per_pair = anchor_in_sigmoid_losses(
                h_chosen, h_rejected, base.logratio, beta, anchor_weight
            )
        else:
            per_pair = dpo + anchor_weight * anchor
    loss = per_pair.mean()
    metrics: Metrics = {
        "loss": loss.detach(),
        "dpo_loss": dpo.detach().mean(),
        "anchor_loss": anchor.detach().mean(),
        **preference_metrics(h_chosen, h_rejected, beta),
    }
    if h_base is not None:
        metrics.update(anchor_metrics(base.logratio))
    return LossResult(loss, metrics)
