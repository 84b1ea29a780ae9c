"""Knowledge-distillation losses: pure functions, chunked over tokens.

Notation: p is the teacher's distribution, q the student's; ``t = log p`` and ``s = log q``.

    fkl   KL(p || q)                                   forward KL, mode covering
    rkl   KL(q || p)                                   reverse KL, mode seeking
    jsd   beta KL(p || m) + (1-beta) KL(q || m),       m = beta p + (1-beta) q
    skl   KL(p || alpha p + (1-alpha) q)               skew forward KL (DistiLLM)
    srkl  KL(q || (1-alpha) p + alpha q)               skew reverse KL (DistiLLM)
    tvd   0.5 sum |p - q|                              total variation distance

The JSD follows TRL's ``GKDTrainer.generalized_jsd_loss`` (GKD, Agarwal et al. 2024, eq. 1):
the mixture puts weight ``beta`` on the teacher, and the end points are special-cased as TRL
does, beta = 0 -> forward KL and beta = 1 -> reverse KL (the plain formula would be 0 there).

Both distributions are softened with the temperature T and the KD term is scaled by T^2 so its
gradient magnitude does not depend on T (Hinton et al. 2015). ``distillation_loss`` mixes it with
cross-entropy: ``loss = ce_ratio * CE + (1 - ce_ratio) * KD``, both means over the tokens whose
label is not ``ignore_index``.

The teacher is dense (logits over the full vocabulary) or sparse (its top-k token ids and
log-probs at T = 1, and optionally the log of the mass outside them, the "tail", as the teacher
cache stores it). In the sparse form both distributions are collapsed onto k + 1 buckets: the k
ids and one tail bucket holding the remaining mass, and the divergence is taken between these
bucket distributions (exact when k equals the vocabulary size). The teacher's tail is floored
at ``TAIL_FLOOR`` (why: see there), so every loss stays finite with bounded gradients even on
float32 server log-probs whose top-k sums to 1 or more.

Memory: the student logits may be [B, T, 129k]. ``distillation_loss`` only ever works on
``chunk_size`` tokens at a time, in the forward and in the backward (which recomputes each chunk,
like activation checkpointing, and writes its gradient straight into the logits' gradient), so
the float32 working set does not grow with the sequence length: measured on CPU it peaks at
about 9 (fkl, tvd) to 13 (jsd) chunk x vocab float32 tensors for a dense teacher and about 3
for a sparse one, plus one logits-sized gradient. At a 129k vocabulary and chunk_size=1024 one
such tensor is 0.5 GB; lower chunk_size if that is too much.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_NAMES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")

# Stand-in for log(0). -inf would turn 0 * (-inf) into NaN in values and gradients; exp(_NEG) is
# exactly 0 and _NEG / T stays finite for any sane temperature.
_NEG = -1e30

# The teacher's tail bucket is at least this mass (when k < vocabulary). Why 1e-6: a server's
# float32 log-probs (vLLM: logits - logsumexp in float32) carry the logsumexp's rounding, about
# 1e-6 at logit magnitudes of 8 to 16, so a tail below that is noise, and ``1 - sum(exp(top-k))``
# is often exactly 0 or negative (vLLM returns 0.0 for the top token of a confident position).
# An unfloored log(0) enters rkl/jsd/srkl as -1e30 and gives values and gradients ~1e30. With the
# floor |log p_tail| <= 13.8, which bounds the tail's share of every loss and of its gradient;
# the mass it adds (at most 1e-6 a token, renormalised away) changes no result that matters.
TAIL_FLOOR = 1e-6


def _check_hparams(loss: str, beta: float, alpha: float, temperature: float) -> None:
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {LOSS_NAMES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(e^a || e^b) over the last dim, from log-probs already clamped to >= _NEG."""
    return (a.exp() * (a - b)).sum(-1)


def _log_mix(a: Tensor, b: Tensor, w: float) -> Tensor:
    """log(w e^a + (1 - w) e^b)."""
    if w <= 0.0:
        return b
    if w >= 1.0:
        return a
    return torch.logaddexp(a + math.log(w), b + math.log1p(-w))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends (Maechler 2012). No gradient use."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_tail(
    topk_logprobs: Tensor, tail_logprob: Tensor | None = None, full_vocab: bool = False
) -> Tensor:
    """log of the teacher's tail bucket [..., 1] (float64), floored at log(TAIL_FLOOR).

    ``tail_logprob`` [...] is the stored log tail mass (the teacher cache keeps it exact); without
    it the tail is derived as ``1 - sum(exp(topk_logprobs))`` in float64. ``full_vocab`` (k equals
    the vocabulary): the tail is empty, -> _NEG, and no floor (it would add mass that is not there).
    """
    shape = (*topk_logprobs.shape[:-1], 1)
    if full_vocab:
        return torch.full(shape, _NEG, dtype=torch.float64, device=topk_logprobs.device)
    if tail_logprob is None:
        top_mass = torch.logsumexp(topk_logprobs.detach().double(), -1, keepdim=True)
        tail = _log1mexp(top_mass.clamp(max=0.0))
    else:
        if tuple(tail_logprob.shape) != shape[:-1]:
            raise ValueError(
                f"teacher tail shape {tuple(tail_logprob.shape)} does not match the top-k "
                f"{tuple(topk_logprobs.shape)} (expected {shape[:-1]})"
            )
        tail = tail_logprob.detach().double()[..., None]
    return tail.clamp(min=math.log(TAIL_FLOOR))


def dense_divergence(
    student_logp: Tensor,
    teacher_logp: Tensor,
    loss: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-token divergence between two normalised log-prob tensors [..., V] -> [...].

    No temperature and no T^2 here: pass log-probs that are already tempered. -inf entries
    (masked vocabulary) are fine and give finite gradients.
    """
    _check_hparams(loss, beta, alpha, 1.0)
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student log-probs {tuple(student_logp.shape)} and teacher log-probs "
            f"{tuple(teacher_logp.shape)} must have the same shape"
        )
    s = student_logp.clamp(min=_NEG)
    t = teacher_logp.clamp(min=_NEG)
    if loss == "fkl" or (loss == "jsd" and beta == 0.0):
        return _kl(t, s)
    if loss == "rkl" or (loss == "jsd" and beta == 1.0):
        return _kl(s, t)
    if loss == "jsd":
        m = _log_mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if loss == "skl":
        return _kl(t, _log_mix(t, s, alpha))
    if loss == "srkl":
        return _kl(s, _log_mix(t, s, 1.0 - alpha))
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)  # tvd


def sparse_divergence(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    loss: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    tail_logprob: Tensor | None = None,
) -> Tensor:
    """Per-token divergence against a top-k teacher: [..., V] logits, [..., k] ids/logprobs -> [...].

    ``topk_logprobs`` are the teacher's log-probs at T = 1; the teacher's tail bucket gets
    ``tail_logprob`` [...] (log of the mass outside the top k, as the teacher cache stores it) or,
    without it, ``1 - sum(exp(topk_logprobs))``; floored either way (``teacher_tail``). The
    teacher's buckets are re-normalised (rounding, the floor). The student (at T = 1) is collapsed onto the
    same k ids plus a tail bucket, its log-mass a logsumexp over the non-top-k logits (exact even
    when the student puts almost all its mass on the k ids, unlike log1p(-sum)).

    Temperature (approximation): the (k + 1)-bucket distributions of BOTH sides are tempered,
    ``log_softmax(log_bucket / T)``, i.e. the tail is treated as one token of mass (1 - sum).
    The exact tempered tail would be sum_j p_j^(1/T) over the unseen tail tokens, which the
    teacher does not give us (for T > 1 one bucket underestimates it). Tempering the student the
    same way keeps the loss zero when the student matches the teacher's top-k distribution at any
    T, so the optimum is not biased by the approximation; it is exact when k equals the vocabulary.
    No T^2 factor here (see ``kd_loss``). The teacher is a constant (detached).
    """
    _check_hparams(loss, beta, alpha, temperature)
    z = student_logits.to(_compute_dtype(student_logits))
    ids = topk_ids.long()
    lse = torch.logsumexp(z, -1, keepdim=True)
    s_top = z.gather(-1, ids) - lse
    s_tail = torch.logsumexp(z.scatter(-1, ids, _NEG), -1, keepdim=True) - lse
    s = torch.cat([s_top, s_tail], -1).clamp(min=_NEG)

    with torch.no_grad():
        t_top = topk_logprobs.detach().to(z.dtype)
        full_vocab = ids.shape[-1] >= z.shape[-1]  # k == V: the tail is empty, not rounding
        t_tail = teacher_tail(topk_logprobs, tail_logprob, full_vocab).to(z.dtype)
        t = torch.cat([t_top, t_tail], -1).clamp(min=_NEG)
        # Always re-normalise: rounding (bf16 logprobs) and the tail floor can make the buckets'
        # mass exceed 1.
        t = torch.log_softmax(t / temperature, -1)
    if temperature != 1.0:
        s = torch.log_softmax(s / temperature, -1)
    return dense_divergence(s, t, loss, beta, alpha)


def kd_loss(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_tail: Tensor | None = None,
    loss: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-token KD term ``T^2 * D(teacher, student)`` [..., V] -> [...]: no masking, no chunking.

    Give either ``teacher_logits`` (dense) or the ``teacher_topk_*`` pair (sparse), with the
    optional ``teacher_topk_tail`` (log tail mass [...], see ``sparse_divergence``).
    """
    if teacher_logits is not None:
        _check_hparams(loss, beta, alpha, temperature)
        z = student_logits.to(_compute_dtype(student_logits))
        if temperature != 1.0:
            z = z / temperature
        s = torch.log_softmax(z, -1)
        with torch.no_grad():
            t = torch.log_softmax(teacher_logits.detach().to(z.dtype) / temperature, -1)
        div = dense_divergence(s, t, loss, beta, alpha)
    elif teacher_topk_ids is not None and teacher_topk_logprobs is not None:
        div = sparse_divergence(
            student_logits,
            teacher_topk_ids,
            teacher_topk_logprobs,
            loss,
            beta,
            alpha,
            temperature,
            tail_logprob=teacher_topk_tail,
        )
    else:
        raise ValueError("kd_loss needs teacher_logits or teacher_topk_ids + teacher_topk_logprobs")
    return div * temperature**2


def _chunk_terms(z: Tensor, labels: Tensor, teacher: tuple, opts: tuple) -> tuple[Tensor, Tensor]:
    """(sum of per-token KD, sum of per-token CE) for one chunk of valid tokens z [n, V]."""
    loss, temperature, beta, alpha = opts
    teacher_logits, topk_ids, topk_logprobs, topk_tail = teacher
    zf = z.to(_compute_dtype(z))
    ce = torch.logsumexp(zf, -1) - zf.gather(-1, labels[:, None]).squeeze(-1)
    if teacher_logits is None and topk_ids is None:
        return zf.new_zeros(()), ce.sum()
    kd = kd_loss(
        zf,
        teacher_logits=teacher_logits,
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_logprobs,
        teacher_topk_tail=topk_tail,
        loss=loss,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
    )
    return kd.sum(), ce.sum()


class _ChunkedDistill(torch.autograd.Function):
    """Sums of per-token KD and CE over the valid tokens, chunk by chunk.

    Forward keeps no intermediates. Backward recomputes each chunk with autograd on and
    index-puts its gradient into one zero tensor shaped like the logits, which avoids the
    full-size ``zeros + copy`` that slicing's own backward would do once per chunk.
    """

    @staticmethod
    def forward(ctx, student, idx, labels, logits, topk_ids, topk_logprobs, topk_tail, opts, chunk):
        ctx.save_for_backward(student, idx, labels, logits, topk_ids, topk_logprobs, topk_tail)
        ctx.opts, ctx.chunk = opts, chunk
        kd_sum = student.new_zeros((), dtype=_compute_dtype(student))
        ce_sum = kd_sum.clone()
        for ix, lab, teacher in _chunks(
            idx, labels, (logits, topk_ids, topk_logprobs, topk_tail), chunk
        ):
            kd, ce = _chunk_terms(student[ix], lab, teacher, opts)
            kd_sum += kd
            ce_sum += ce
        return kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        student, idx, labels, *teacher_full = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.zeros_like(student)
            for ix, lab, teacher in _chunks(idx, labels, teacher_full, ctx.chunk):
                with torch.enable_grad():
                    z = student[ix].detach().requires_grad_()
                    kd, ce = _chunk_terms(z, lab, teacher, ctx.opts)
                    (gz,) = torch.autograd.grad(kd * grad_kd + ce * grad_ce, z)
                grad.index_put_(ix, gz)
        return grad, None, None, None, None, None, None, None, None


def _chunks(idx, labels, teacher, chunk):
    """Yield (index tuple, labels, (teacher chunk...)) for consecutive chunks of valid tokens."""
    for a in range(0, idx.shape[0], chunk):
        ix = tuple(idx[a : a + chunk].unbind(1))
        yield ix, labels[a : a + chunk], tuple(None if x is None else x[ix] for x in teacher)


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_tail: Tensor | None = None,
    loss: str = "fkl",
    temperature: float = 1.0,
    ce_ratio: float = 0.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """``{"loss": ce_ratio * ce + (1 - ce_ratio) * kd, "kd": kd, "ce": ce}``.

    student_logits [B, T, V] and labels [B, T] are already aligned (labels[b, t] is the target
    of logits[b, t]). The teacher is ``teacher_logits`` [B, T, V] or the top-k pair
    ``teacher_topk_ids`` / ``teacher_topk_logprobs`` [B, T, k] (log-probs at T = 1), with the
    optional ``teacher_topk_tail`` [B, T] (log of the mass outside the top k, e.g. the teacher
    cache's; derived from the top-k when absent); it may be omitted only when ce_ratio == 1. ``kd`` includes the T^2 factor; ``ce`` is at T = 1. Both are
    means over tokens whose label != ignore_index (0, not NaN, when there are none); masked
    positions are never read, so they may hold anything. The teacher gets no gradient.
    """
    _check_hparams(loss, beta, alpha, temperature)
    if not 0.0 <= ce_ratio <= 1.0:
        raise ValueError(f"ce_ratio must be in [0, 1], got {ce_ratio}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}"
        )
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if tuple(labels.shape) != lead:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match student_logits "
            f"{tuple(student_logits.shape)} (expected {lead})"
        )

    dense = teacher_logits is not None
    sparse = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if teacher_topk_tail is not None and teacher_topk_ids is None:
        raise ValueError("teacher_topk_tail needs teacher_topk_ids and teacher_topk_logprobs")
    if dense and sparse:
        raise ValueError("give either teacher_logits or the teacher_topk_* pair, not both")
    if not dense and not sparse and ce_ratio < 1.0:
        raise ValueError(f"a teacher is required when ce_ratio < 1 (got ce_ratio={ce_ratio})")
    if dense:
        if tuple(teacher_logits.shape[:-1]) != lead:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} does not match "
                f"student_logits {tuple(student_logits.shape)}"
            )
        if teacher_logits.shape[-1] != vocab:
            raise ValueError(
                f"vocabulary mismatch: student has {vocab} logits, teacher has "
                f"{teacher_logits.shape[-1]}; the two must share one tokenizer and vocab size"
            )
    if sparse:
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("sparse teacher needs both teacher_topk_ids and teacher_topk_logprobs")
        if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
            raise ValueError(
                f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
            )
        if tuple(teacher_topk_ids.shape[:-1]) != lead:
            raise ValueError(
                f"teacher top-k shape {tuple(teacher_topk_ids.shape)} does not match "
                f"student_logits {tuple(student_logits.shape)} (expected {lead} + (k,))"
            )
        if teacher_topk_ids.dtype.is_floating_point or teacher_topk_ids.dtype == torch.bool:
            raise ValueError(f"teacher_topk_ids must be integer, got {teacher_topk_ids.dtype}")
        if teacher_topk_tail is not None and tuple(teacher_topk_tail.shape) != lead:
            raise ValueError(
                f"teacher_topk_tail shape {tuple(teacher_topk_tail.shape)} does not match "
                f"student_logits {tuple(student_logits.shape)} (expected {lead})"
            )
        k = teacher_topk_ids.shape[-1]
        if k > vocab:
            raise ValueError(f"top-k size {k} exceeds the student vocabulary size {vocab}")
        if teacher_topk_ids.numel() and (
            int(teacher_topk_ids.max()) >= vocab or int(teacher_topk_ids.min()) < 0
        ):
            raise ValueError(
                f"teacher_topk_ids must be in [0, {vocab}) (student vocabulary size), got ids in "
                f"[{int(teacher_topk_ids.min())}, {int(teacher_topk_ids.max())}]"
            )

    valid = labels != ignore_index
    idx = valid.nonzero()  # [n, len(lead)]
    targets = labels[valid].long()
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got labels in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    kd_sum, ce_sum = _ChunkedDistill.apply(
        student_logits,
        idx,
        targets,
        teacher_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_topk_tail,
        (loss, temperature, beta, alpha),
        chunk_size,
    )
    n = max(idx.shape[0], 1)
    kd, ce = kd_sum / n, ce_sum / n
    return {"loss": ce_ratio * ce + (1.0 - ce_ratio) * kd, "kd": kd, "ce": ce}
