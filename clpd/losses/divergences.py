"""Per-token divergences: pure functions of fp32 log-probabilities ``(s_logp, t_logp)`` of shape
``[N, V]`` (s = student, t = teacher) returning ``[N]``, and ``DIVERGENCES``, their names.

Zero probabilities. A ``-inf`` logit (a masked vocabulary row) gives a zero probability and a
``-inf`` log-probability, and large logit gaps underflow probabilities to zero. Inside the
divergences ``0 * log 0`` counts as 0, and a log-probability below ``LOG_PROB_FLOOR`` (the log of
the smallest normal fp32 number, about -87.3) is read as ``LOG_PROB_FLOOR``: probabilities fp32
cannot hold anyway count as 1.2e-38 inside logarithms. This keeps every value and gradient finite.
The one place it changes a result is where the exact answer is +inf: student mass on a row the
teacher gives zero probability under reverse KL (or teacher mass on a row the student gives zero
under forward KL) costs about 87 nats per unit of mass instead of infinity, and the gradient pushes
that mass off the row.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch


# log of the smallest normal fp32 number (~ -87.34): see the module docstring.
LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)



def _floor(logp: torch.Tensor) -> torch.Tensor:
    return logp.clamp(min=LOG_PROB_FLOOR)



def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last dim, with 0 log 0 = 0.

    ``p`` comes from the unfloored log-probabilities, so a row with ``logp = -inf`` has p = 0
    exactly and contributes 0 (and a zero gradient); the logarithms are floored so that the
    difference is always finite.
    """
    return (logp.exp() * (_floor(logp) - _floor(logq))).sum(-1)



def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q) for 0 < w < 1, computed in log space (no underflow)."""
    return torch.logaddexp(_floor(logp) + math.log(w), _floor(logq) + math.log1p(-w))



def _check_unit_interval(name: str, value: float, *, include_one: bool) -> None:
    ok = 0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if include_one else ')'}, got {value}")



def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, **_) -> torch.Tensor:
    """KL(teacher || student) = sum_v p_t (log p_t - log p_s): mean-seeking; the classic KD loss
    (Hinton et al. 2015). Its gradient w.r.t. the student logits is p_s - p_t."""
    return _kl(t_logp, s_logp)



def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, **_) -> torch.Tensor:
    """KL(student || teacher) = sum_v p_s (log p_s - log p_t): mode-seeking (MiniLLM, GKD)."""
    return _kl(s_logp, t_logp)



def jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, *, beta: float = 0.5, **_) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes", Eq. 1), ``beta`` weighting the
    TEACHER:

        M = beta * P_T + (1 - beta) * P_S
        JSD(beta) = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)

    This is exactly what TRL's ``GKDTrainer.generalized_jsd_loss`` computes for 0 < beta < 1
    (mixture ``logsumexp([s + log(1 - beta), t + log(beta)])``, ``beta * kl_teacher +
    (1 - beta) * kl_student``). beta = 0.5 is the symmetric JSD, bounded by log 2.

    Endpoints, as TRL handles them: the formula above is identically 0 at beta = 0 and beta = 1
    (M equals one of the two distributions and that term's weight vanishes), so, like TRL, beta = 0
    returns the forward KL(P_T || P_S) and beta = 1 the reverse KL(P_S || P_T). These are the limits
    of JSD(beta) / beta as beta -> 0 and of JSD(beta) / (1 - beta) as beta -> 1, NOT of JSD(beta):
    the loss jumps at the endpoints, and near them beta mostly scales the loss (JSD(0.01) is about
    0.01 * forward KL). So beta = 0.9 is roughly "a tenth of a reverse-KL-like loss", not "almost reverse KL";
    for pure forward / reverse KL prefer the ``forward_kl`` / ``reverse_kl`` divergences.
    """
    _check_unit_interval("beta", beta, include_one=True)
    if beta == 0.0:
        return forward_kl(s_logp, t_logp)
    if beta == 1.0:
        return reverse_kl(s_logp, t_logp)
    log_m = _log_mixture(t_logp, s_logp, beta)
    return beta * _kl(t_logp, log_m) + (1.0 - beta) * _kl(s_logp, log_m)



def skew_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, *, lam: float = 0.1, **_) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models", ICML): with p = teacher and q = student,

        SKL(lam) = KL(p || lam * p + (1 - lam) * q)

    as in the authors' ``distillm/losses.py::skewed_forward_kl`` (``mixed_probs = lam *
    teacher_probs + (1 - lam) * student_probs``; their code drops the constant teacher-entropy
    term, which changes the value but not the gradient; here it is kept, so SKL is 0 at p = q).
    The gradient flows through the mixture too, as in theirs. lam = 0 is the forward KL; the
    paper's default is lam = 0.1; lam must be < 1 (at 1 the loss is identically 0).
    """
    _check_unit_interval("lam", lam, include_one=False)
    if lam == 0.0:
        return forward_kl(s_logp, t_logp)
    return _kl(t_logp, _log_mixture(t_logp, s_logp, lam))



def skew_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, *, lam: float = 0.1, **_) -> torch.Tensor:
    """Skew reverse KL of DistiLLM (Ko et al. 2024): with p = teacher and q = student,

        SRKL(lam) = KL(q || (1 - lam) * p + lam * q)

    as in ``distillm/losses.py::skewed_reverse_kl`` (``mixed_probs = (1 - lam) * teacher_probs +
    lam * student_probs``). lam = 0 is the reverse KL; lam must be < 1.
    """
    _check_unit_interval("lam", lam, include_one=False)
    if lam == 0.0:
        return reverse_kl(s_logp, t_logp)
    return _kl(s_logp, _log_mixture(s_logp, t_logp, lam))



def tvd(s_logp: torch.Tensor, t_logp: torch.Tensor, **_) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p_t - p_s|, in [0, 1] and symmetric (DistiLLM's
    ``tv_distance``)."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)



Divergence = Callable[..., torch.Tensor]



DIVERGENCES: Dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}



LOSS_NAMES = ("sft", *DIVERGENCES)
