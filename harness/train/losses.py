"""Training losses as pure functions of logits (and hidden states for OneBit).

Conventions, all losses:

- ``student_logits`` / ``teacher_logits`` are ``[B, T, V]``; ``labels`` is ``[B, T]``, the
  next-token target of each logit position, ``-100`` where the position is ignored.
- No temperature: both papers distil at T = 1.
- Accumulation in at least fp32 whatever the logits' dtype (bf16 log-softmax over 32k-150k
  classes loses too much; fp64 stays fp64), through ``log_softmax`` only (never
  ``softmax(...).log()``).
- Reduction of the distillation losses (``fkl``, ``rkl``, ``jsd``, ``cakld``) follows
  BitDistiller's ``train/mytrainer.py``: per-position divergence summed over the vocabulary,
  masked, summed over the positions of each sequence, then averaged over the sequences of the
  batch ("batchmean"). The loss therefore grows with sequence length: learning rates tuned for
  token-mean losses are about ``T`` times too large for it. ``reduction="mean"`` (per valid
  position) is offered for ablations.

Where the reference differs (documented per function): BitDistiller masks the *unshifted*
positions (its KD losses weight the logit at position ``t`` by ``labels[t] != -100`` although that
logit predicts token ``t + 1``; here logits and labels are already aligned, so the mask is the
next-token one); its JSD uses ``log`` of the mixed probabilities (here a stable logsumexp).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from harness.api import ObjectiveInputs
from harness.errors import HarnessError
from harness.registry import Registry

IGNORE_INDEX = -100
Reduction = Literal["batchmean", "mean"]


# ----------------------------------------------------------------------------- helpers


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, summed over the last (vocabulary) dimension.

    ``p * (log p - log q)`` with the convention ``0 * log 0 = 0`` (a ``-inf`` logit in P would
    otherwise give NaN).
    """
    p = logp.exp()
    return (p * (logp - logq)).masked_fill(p == 0, 0.0).sum(-1)


class _KLPair(torch.autograd.Function):
    """Per position ``w_rev KL(S || T) + w_fwd KL(T || S)`` from logits, gradient to ``S`` only.

    The value is :func:`_kl`'s, bit for bit. The backward is analytic, with ``q = softmax(s)``,
    ``p = softmax(t)``: ``d KL(T || S) / ds = q - p`` and
    ``d KL(S || T) / ds = q (log q - log p - KL(S || T))`` (0 where ``q = 0``, the ``0 log 0``
    convention). Autograd's graph of the same formula keeps about five ``[B, T, V]`` fp32
    tensors and makes about twice the passes over them; this keeps the two log-probability
    tensors.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, w_rev: float, w_fwd: float):
        logq, logp = _log_probs(s), _log_probs(t)
        kl_rev = _kl(logq, logp) if w_rev else None
        terms = ([kl_rev * w_rev] if w_rev else []) + ([_kl(logp, logq) * w_fwd] if w_fwd else [])
        per_pos = sum(terms) if terms else logq.new_zeros(logq.shape[:-1])
        ctx.save_for_backward(logq, logp, kl_rev)
        ctx.weights, ctx.s_dtype = (w_rev, w_fwd), s.dtype
        return per_pos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logq, logp, kl_rev = ctx.saved_tensors
        w_rev, w_fwd = ctx.weights
        q = logq.exp()
        out = torch.sub(q, logp.exp()).mul_(w_fwd) if w_fwd else torch.zeros_like(q)
        if w_rev:
            rev = (logq - logp).sub_(kl_rev.unsqueeze(-1)).mul_(q).masked_fill_(q == 0, 0.0)
            out.add_(rev, alpha=w_rev)
        out.mul_(grad.unsqueeze(-1))
        return out.to(ctx.s_dtype), None, None, None


def _kl_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, w_rev: float,
             w_fwd: float) -> torch.Tensor:
    """``w_rev KL(S || T) + w_fwd KL(T || S)`` per position (``[B, T]``)."""
    if teacher_logits.requires_grad:  # the analytic backward sends nothing to the teacher
        logs, logt = _log_probs(student_logits), _log_probs(teacher_logits)
        return w_rev * _kl(logs, logt) + w_fwd * _kl(logt, logs)
    return _KLPair.apply(student_logits, teacher_logits, float(w_rev), float(w_fwd))


def _mask(labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if labels is None:
        return torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return (labels != IGNORE_INDEX).float()


def _reduce(per_pos: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Masks a ``[B, T]`` per-position loss and reduces it (see the module docstring)."""
    masked = per_pos * mask
    if reduction == "batchmean":
        return masked.sum(-1).mean()
    if reduction == "mean":
        return masked.sum() / mask.sum().clamp_min(1.0)
    raise HarnessError(f"unknown loss reduction {reduction!r}; use 'batchmean' or 'mean'")


def _need_teacher(teacher_logits: torch.Tensor | None, name: str) -> torch.Tensor:
    if teacher_logits is None:
        raise ValueError(f"loss {name!r} needs teacher logits; the objective must set needs_teacher")
    return teacher_logits


# ----------------------------------------------------------------------------- losses


def ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the valid positions.

    ``CE = -(1/N) sum_{b,t: y != -100} log softmax(s_{b,t})[y_{b,t}]``. Token-mean, as the Hugging
    Face model loss the reference QAT baseline trains with (not token-summed like the KD losses).

    Args:
        student_logits: ``[B, T, V]``.
        labels: ``[B, T]`` next-token targets, ``-100`` ignored.

    Returns:
        Scalar fp32 tensor (0 when no position is valid).
    """
    logp = _log_probs(student_logits)
    mask = _mask(labels, logp)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor | None, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Forward KL, KL(T || S) = sum_v p_T (log p_T - log p_S), mode-covering.

    Reference: ``ce_loss`` in BitDistiller's ``train/mytrainer.py``
    (``kl_div(log_softmax(S), softmax(T))``), reduced as in the module docstring.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]``; positions with ``-100`` are excluded (``None``: all positions).
        reduction: ``"batchmean"`` (sum over positions, mean over sequences) or ``"mean"``.

    Returns:
        Scalar fp32 tensor.
    """
    return _reduce(_kl_pair(student_logits, teacher_logits, 0.0, 1.0),
                   _mask(labels, student_logits), reduction)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor | None, reduction: Reduction = "batchmean") -> torch.Tensor:
    """Reverse KL, KL(S || T) = sum_v p_S (log p_S - log p_T), mode-seeking.

    Reference: ``re_loss`` in BitDistiller's ``train/mytrainer.py``
    (``kl_div(log_softmax(T), softmax(S))``; its comment says KL(T||S) but the call computes
    KL(S||T)). Arguments and reduction as :func:`forward_kl`.
    """
    return _reduce(_kl_pair(student_logits, teacher_logits, 1.0, 0.0),
                   _mask(labels, student_logits), reduction)


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
        labels: torch.Tensor | None, beta: float = 0.5,
        reduction: Reduction = "batchmean") -> torch.Tensor:
    """Generalised Jensen-Shannon divergence.

    ``M = beta p_T + (1 - beta) p_S``; ``JSD = beta KL(T || M) + (1 - beta) KL(S || M)``, as
    ``jsd_loss`` in BitDistiller's ``train/mytrainer.py`` (called with beta 0.5). ``log M`` is a
    logsumexp of the two log-probabilities instead of the reference's ``M.log()`` (same value,
    no ``log 0``).

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]``; ``-100`` positions excluded.
        beta: teacher weight in the mixture, in ``[0, 1]``.
        reduction: as :func:`forward_kl`.

    Returns:
        Scalar fp32 tensor.

    Raises:
        HarnessError: ``beta`` outside ``[0, 1]``.
    """
    if not 0.0 <= beta <= 1.0:
        raise HarnessError(f"jsd beta must be in [0, 1], got {beta}; set loss_params.beta")
    logs, logt = _log_probs(student_logits), _log_probs(teacher_logits)
    log_w = torch.tensor([beta, 1.0 - beta], dtype=torch.float32, device=logs.device).log()
    logm = torch.logsumexp(torch.stack([logt + log_w[0], logs + log_w[1]]), dim=0)
    per_pos = beta * _kl(logt, logm) + (1.0 - beta) * _kl(logs, logm)
    return _reduce(per_pos, _mask(labels, logs), reduction)


def tlsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
         scale_temperature: float = 10.0) -> torch.Tensor:
    """Token-scaled logit distillation (TSLD, Kim et al. 2023), BitDistiller's ``TLSD_loss``.

    Per sequence, each valid position gets the weight ``w_t = softmax_t(CE_T(t) / 10)`` where
    ``CE_T(t) = -log p_T(y_t)`` is the teacher's own next-token loss (detached: tokens the teacher
    finds hard weigh more); the loss is ``sum_b sum_t w_t * (-sum_v p_T log p_S)``.

    As the reference: soft cross-entropy, not KL (minimum = the teacher's entropy, same
    gradient), and *summed* over the batch, not averaged. Differences: the reference gives
    ``-100`` positions a CE of 0 and keeps them in the softmax and the sum (prompt tokens are
    distilled too); here they get weight 0. The reference shifts logits and labels itself; here
    they arrive aligned.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]`` next-token targets, ``-100`` ignored.
        scale_temperature: divisor of the teacher CE inside the token softmax (reference: 10).

    Returns:
        Scalar fp32 tensor.
    """
    logs, logt = _log_probs(student_logits), _log_probs(teacher_logits)
    valid = labels != IGNORE_INDEX
    tc_ce = -logt.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    scores = (tc_ce / scale_temperature).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0).detach()  # all-masked row -> 0
    soft_ce = -(logt.exp() * logs).sum(-1)
    return (soft_ce * weights).sum()


def cakld(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          labels: torch.Tensor | None, gamma: float,
          reduction: Reduction = "batchmean") -> torch.Tensor:
    """Confidence-aware KL (BitDistiller section 3.3).

    ``CAKLD = gamma KL(S || T) + (1 - gamma) KL(T || S)``, per position, reduced as
    :func:`forward_kl`; reference ``cakld_loss`` in ``train/mytrainer.py``.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]``; ``-100`` positions excluded.
        gamma: weight of the reverse (mode-seeking) term, see :func:`gamma_paper`.
        reduction: as :func:`forward_kl`.

    Returns:
        Scalar fp32 tensor.
    """
    return _reduce(_kl_pair(student_logits, teacher_logits, gamma, 1.0 - gamma),
                   _mask(labels, student_logits), reduction)


# ----------------------------------------------------------------------------- CAKLD gamma


@torch.no_grad()
def gamma_paper(teacher_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """CAKLD gamma as the paper defines it: the teacher's mean probability of the data tokens.

    ``gamma = (1/N) sum_{valid (b,t)} p_T(y_{b,t} | x_{<t})``.

    Args:
        teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]`` next-token targets, ``-100`` ignored.

    Returns:
        gamma in ``[0, 1]`` (0 when no position is valid).
    """
    logt = _log_probs(teacher_logits)
    mask = _mask(labels, logt)
    p = logt.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).exp()
    return float((p * mask).sum() / mask.sum().clamp_min(1.0))


@torch.no_grad()
def gamma_code(teacher_logits_batches: Iterable[torch.Tensor], cakld_steps: int = 10) -> float:
    """CAKLD gamma as BitDistiller's ``train/train.py`` computes it.

    The reference loops over batches with ``if step > cakld_steps: break`` (so it sees
    ``cakld_steps + 1 = 11`` batches), adds each batch's mean over *all* positions (padding and
    prompt included, no labels) of the teacher's max probability ``max_v p_T(v)``, and divides
    the sum by ``cakld_steps`` (10): with 11 batches that is 1.1 x their mean, and it can exceed
    1. Reproduced exactly, including with fewer batches (still divided by ``cakld_steps``).

    Args:
        teacher_logits_batches: the teacher's ``[B, T, V]`` logits of each batch (any
            iterable: a generator keeps one batch alive at a time).
        cakld_steps: the reference's ``--cakld_steps`` (default 10).

    Returns:
        ``sum_i mean_{b,t} max_v p_T,i / cakld_steps``.
    """
    total = 0.0
    for logits in teacher_logits_batches:
        total += float(_log_probs(logits).amax(-1).exp().mean())
    return total / cakld_steps


# ----------------------------------------------------------------------------- OneBit


def onebit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None, student_hidden: Sequence[torch.Tensor] | None,
                teacher_hidden: Sequence[torch.Tensor] | None, alpha: float = 1.0,
                kd_scale: float = 1.0, hidden_states: Literal["code", "all"] = "code"
                ) -> torch.Tensor:
    """OneBit's distillation loss (paper section 3.3): ``kd_scale * L_KD + alpha * L_hidden``.

    ``L_KD = KL(T || S)`` summed over vocabulary and positions, mean over sequences (the
    reference's ``kl_div(..., reduction="batchmean")`` in ``llama_factory/llamafactory/kd.py``;
    it does not mask, here ``-100`` positions are excluded). ``L_hidden = sum_l mean_{tokens}
    || h_T / ||h_T|| - h_S / ||h_S|| ||^2`` with ``F.normalize`` over the hidden dimension
    (eps 1e-12), every position included, as ``kd.py``. Paper: ``kd_scale = 1``; the reference
    scripts pass ``--kd_loss_scale 0.01``.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]`` (``-100`` excluded from L_KD) or ``None`` for every position.
        student_hidden: Hugging Face ``hidden_states`` tuple: embedding output, then one entry
            per decoder layer (the last after the final norm), each ``[B, T', H]``.
        teacher_hidden: same layout from the teacher (detached here).
        alpha: weight of L_hidden (``--kd_beta`` in the reference); 0 skips it.
        kd_scale: weight of L_KD.
        hidden_states: ``"code"``: entries ``0 .. n_layers - 1`` as ``kd.py`` loops
            ``range(n_layers)`` (embedding output plus every layer output but the last, normed,
            one); ``"all"``: every entry.

    Returns:
        Scalar fp32 tensor.

    Raises:
        ValueError: ``alpha > 0`` without hidden states, or mismatched tuples.
    """
    loss = kd_scale * forward_kl(student_logits, teacher_logits, labels)
    if alpha == 0:
        return loss
    if student_hidden is None or teacher_hidden is None or len(student_hidden) != len(
            teacher_hidden):
        raise ValueError("onebit_loss needs equally long student and teacher hidden-state tuples")
    pairs = list(zip(student_hidden, teacher_hidden, strict=True))
    if hidden_states == "code":
        pairs = pairs[:-1]
    if not pairs:
        return loss
    # All layers as one [L, tokens, H] tensor: a dozen ops per pass instead of a dozen per
    # layer (on a GPU the step's cost is largely the ops it dispatches).
    hs = torch.stack([h.float().reshape(-1, h.shape[-1]) for h, _ in pairs])
    ht = torch.stack([t.detach().float().reshape(-1, t.shape[-1]) for _, t in pairs])
    per_layer = (F.normalize(hs, p=2, dim=-1) - F.normalize(ht, p=2, dim=-1)).pow(2).sum(-1)
    return loss + alpha * per_layer.mean(-1).sum()


# ----------------------------------------------------------------------------- registry

LossFn = Callable[..., torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss function")


@LOSSES.decorator("ce")
def _ce(inputs: ObjectiveInputs) -> torch.Tensor:
    return ce(inputs.student_logits, inputs.labels)


@LOSSES.decorator("fkl")
def _fkl(inputs: ObjectiveInputs, reduction: Reduction = "batchmean") -> torch.Tensor:
    return forward_kl(inputs.student_logits, _need_teacher(inputs.teacher_logits, "fkl"),
                      inputs.labels, reduction)


@LOSSES.decorator("rkl")
def _rkl(inputs: ObjectiveInputs, reduction: Reduction = "batchmean") -> torch.Tensor:
    return reverse_kl(inputs.student_logits, _need_teacher(inputs.teacher_logits, "rkl"),
                      inputs.labels, reduction)


@LOSSES.decorator("jsd")
def _jsd(inputs: ObjectiveInputs, beta: float = 0.5,
         reduction: Reduction = "batchmean") -> torch.Tensor:
    return jsd(inputs.student_logits, _need_teacher(inputs.teacher_logits, "jsd"), inputs.labels,
               beta, reduction)


@LOSSES.decorator("tlsd")
def _tlsd(inputs: ObjectiveInputs, scale_temperature: float = 10.0) -> torch.Tensor:
    return tlsd(inputs.student_logits, _need_teacher(inputs.teacher_logits, "tlsd"),
                inputs.labels, scale_temperature)


@LOSSES.decorator("cakld")
def _cakld(inputs: ObjectiveInputs, gamma: float | None = None,
           reduction: Reduction = "batchmean") -> torch.Tensor:
    if gamma is None or not math.isfinite(gamma):
        raise HarnessError("loss 'cakld' needs a finite gamma; set the method's gamma "
                           "('paper', 'code' or a number)")
    return cakld(inputs.student_logits, _need_teacher(inputs.teacher_logits, "cakld"),
                 inputs.labels, gamma, reduction)


def get_loss(name: str) -> LossFn:
    """The registered loss ``name`` with signature ``fn(inputs: ObjectiveInputs, **params)``.

    Args:
        name: one of ``LOSSES.names()`` (``ce``, ``fkl``, ``rkl``, ``jsd``, ``tlsd``, ``cakld``).

    Returns:
        The loss function.

    Raises:
        HarnessError: unknown name; the message lists the valid ones.
    """
    return LOSSES.get(name)
