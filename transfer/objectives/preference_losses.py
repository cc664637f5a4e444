"""The preference losses, as rows of one table (TRL's way): DPO, IPO, CPO, SimPO and ORPO on pairs, KTO on answers.

Every row reads the same scores of each answer (`Scores`): the policy's summed log-probability
of its tokens, the reference's where the method has one, and the answer's length. A new pair
loss is a function here and its name in PAIR_LOSSES (besides its row in config/objective.py and
its YAML). With p, c the policy's and the reference's log-probs, |y| the answer's tokens, z KTO's
KL estimate and s_eps(x) = -(1-eps) log sigmoid(x) - eps log sigmoid(-x):

    dpo    s_eps(beta * ((p_c - c_c) - (p_r - c_r)))                       Rafailov et al. 2023
    ipo    ((p_c - c_c)/|y_c| - (p_r - c_r)/|y_r| - 1/(2 beta))^2          Azar et al. 2023 (per token, as TRL)
    cpo    s_eps(beta * (p_c - p_r)) + cpo_alpha * (-p_c/|y_c|)             Xu et al. 2024
    simpo  s_eps(beta * (p_c/|y_c| - p_r/|y_r|) - gamma)                    Meng et al. 2024
    orpo   -p_c/|y_c| - lambda_or * log sigmoid(log odds(p_c/|y_c|) - log odds(p_r/|y_r|))   Hong et al. 2024
    kto    desirable: lambda_D (1 - sigmoid(beta (p - c - z))); undesirable: lambda_U (1 - sigmoid(beta (z - p + c)))

The answer likelihood terms of CPO and ORPO are each pair's mean token log-likelihood (TRL
takes the mean over the batch's tokens: the same when the answers are equally long).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Scores:
    """One kind of answer of a batch (the chosen, the rejected, or KTO's): per answer."""

    policy: torch.Tensor  # summed log-probability of the answer's tokens
    reference: torch.Tensor | None
    length: torch.Tensor  # the answer's tokens


def smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-log sigmoid(x), with a share eps of the labels assumed flipped (conservative DPO)."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo(c: Scores, r: Scores, cfg):
    chosen, rejected = cfg.beta * (c.policy - c.reference), cfg.beta * (r.policy - r.reference)
    return smoothed(chosen - rejected, cfg.label_smoothing), chosen, rejected


def ipo(c: Scores, r: Scores, cfg):
    h = (c.policy - c.reference) / c.length - (r.policy - r.reference) / r.length
    return (h - 1 / (2 * cfg.beta)) ** 2, cfg.beta * (c.policy - c.reference), cfg.beta * (r.policy - r.reference)


def cpo(c: Scores, r: Scores, cfg):
    losses = smoothed(cfg.beta * (c.policy - r.policy), cfg.label_smoothing) + cfg.cpo_alpha * (-c.policy / c.length)
    return losses, cfg.beta * c.policy, cfg.beta * r.policy


def simpo(c: Scores, r: Scores, cfg):
    chosen, rejected = c.policy / c.length, r.policy / r.length
    return (
        smoothed(cfg.beta * (chosen - rejected) - cfg.gamma, cfg.label_smoothing),
        cfg.beta * chosen,
        cfg.beta * rejected,
    )


def orpo(c: Scores, r: Scores, cfg):
    chosen, rejected = c.policy / c.length, r.policy / r.length
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - cfg.lambda_or * F.logsigmoid(log_odds), cfg.lambda_or * chosen, cfg.lambda_or * rejected


PAIR_LOSSES = {"dpo": dpo, "ipo": ipo, "cpo": cpo, "simpo": simpo, "orpo": orpo}


def kto(s: Scores, desirable: torch.Tensor, z: torch.Tensor, cfg):
    """KTO's per-answer losses and rewards; z is the (detached) KL estimate."""
    ratio = s.policy - s.reference
    losses = torch.where(
        desirable,
        cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - z))),
        cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z - ratio))),
    )
    return losses, cfg.beta * ratio
