"""BAPO and DPO losses as small pure functions (tensors in, loss + metrics out; no I/O).

Notation, per pair in a batch of B: log-ratio h(y) = log πθ(y|x) − log πref(y|x) with sequence
log-probs summed over response tokens; y_w chosen, y_l rejected, y_b the base model's own response;
β the DPO temperature, λ the anchor weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def dpo_losses(h_chosen: torch.Tensor, h_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss  L_DPO = −log σ(β (h_w − h_l)).  [B], [B] → [B]."""
    return -F.logsigmoid(beta * (h_chosen - h_rejected))


def anchor_hinge(h_base: torch.Tensor) -> torch.Tensor:
    """Per-pair base anchor  L_anchor = max(0, −h_b).  [B] → [B]; zero (and flat) when h_b ≥ 0."""
    return torch.relu(-h_base)  # relu: gradient exactly 0 at h_b = 0 (clamp would pass it)


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
    h_base: torch.Tensor | None,
    *,
    beta: float,
    anchor_weight: float,
    anchor_form: str = "hinge",
) -> tuple[torch.Tensor, Metrics]:
    """Batch loss and metrics; h_* are [B] log-ratios, h_base may be None when λ = 0 (DPO).

    hinge (default):  L = mean_B( −log σ(β (h_w − h_l)) + λ max(0, −h_b) )
    sigmoid:          L = mean_B( −log σ(β (h_w − h_l) − β λ max(0, −h_b)) )
    Returns (scalar loss with grad, metrics of detached scalars: loss, dpo_loss, anchor_loss,
    reward_accuracy, reward_margin and, when h_base is given, anchor_logratio, anchor_below_frac).
    """
    dpo = dpo_losses(h_chosen, h_rejected, beta)
    if h_base is None:
        if anchor_weight != 0:
            raise ValueError("h_base is required when anchor_weight != 0")
        anchor = dpo.new_zeros(dpo.shape)
        per_pair = dpo
    elif anchor_form == "hinge":
        anchor = anchor_hinge(h_base)
        per_pair = dpo + anchor_weight * anchor
    elif anchor_form == "sigmoid":
        anchor = anchor_hinge(h_base)
        per_pair = anchor_in_sigmoid_losses(h_chosen, h_rejected, h_base, beta, anchor_weight)
    else:
        raise ValueError(f"unknown anchor_form {anchor_form!r}")
    loss = per_pair.mean()
    metrics: Metrics = {
        "loss": loss.detach(),
        "dpo_loss": dpo.detach().mean(),
        "anchor_loss": anchor.detach().mean(),
        **preference_metrics(h_chosen, h_rejected, beta),
    }
    if h_base is not None:
        metrics.update(anchor_metrics(h_base))
    return loss, metrics
