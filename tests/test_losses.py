"""Tests for moe2edge.distill.losses against float64 references written out here from the definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe2edge.distill.losses import (
    LOSS_NAMES,
    TAIL_FLOOR,
    dense_divergence,
    distillation_loss,
    kd_loss,
    sparse_divergence,
)

B, T, V, K = 2, 7, 16, 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: with a busy 2-core box, OpenMP's thread hand-off costs ms per op.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HP = {"beta": 0.3, "alpha": 0.2}  # off the defaults so a swapped beta/alpha convention shows up


def make_batch(seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, 5] = -100
    return student.requires_grad_(), teacher, labels


def topk_of(teacher, k=K):
    logp = torch.log_softmax(teacher.detach().float(), -1)
    lp, ids = logp.topk(k, -1)
    return ids, lp


# ---- float64 references ------------------------------------------------------------------


def ref_div(p, q, loss, beta=0.5, alpha=0.1):
    """Divergence between teacher probs p and student probs q [..., V] (all entries > 0)."""

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if loss == "fkl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if loss == "skl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if loss == "srkl":
        return kl(q, (1 - alpha) * p + alpha * q)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(loss)


def ref_dense(student, teacher, labels, loss, temp, **hp):
    q = torch.softmax(student.double() / temp, -1)
    p = torch.softmax(teacher.double() / temp, -1)
    keep = labels != -100
    return temp**2 * ref_div(p, q, loss, **hp)[keep].mean()


def ref_sparse(student, ids, lp, labels, loss, temp, **hp):
    """Buckets: the k ids plus a tail of 1 - sum; both sides tempered as p_i^(1/T) / Z."""
    q = torch.softmax(student.double(), -1).gather(-1, ids)
    p = lp.double().exp()
    qb = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1) ** (1 / temp)
    pb = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1) ** (1 / temp)
    qb, pb = qb / qb.sum(-1, keepdim=True), pb / pb.sum(-1, keepdim=True)
    keep = labels != -100
    return temp**2 * ref_div(pb, qb, loss, **hp)[keep].mean()


def grad_of(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


# ---- value against the references ---------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_dense_matches_reference(loss, temp):
    student, teacher, labels = make_batch()
    out = distillation_loss(
        student, labels, teacher_logits=teacher, loss=loss, temperature=temp, **HP
    )
    ref = ref_dense(student, teacher, labels, loss, temp, **HP)
    assert out["kd"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    # the gradient too (the backward is hand-chunked, so check it against plain autograd)
    g_ref = grad_of(ref, student).float()
    torch.testing.assert_close(grad_of(out["loss"], student), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_sparse_matches_reference(loss, temp):
    student, teacher, labels = make_batch(seed=1)
    ids, lp = topk_of(teacher)
    out = distillation_loss(
        student,
        labels,
        teacher_topk_ids=ids,
        teacher_topk_logprobs=lp,
        loss=loss,
        temperature=temp,
        **HP,
    )
    ref = ref_sparse(student, ids, lp, labels, loss, temp, **HP)
    assert out["kd"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g_ref = grad_of(ref, student).float()
    torch.testing.assert_close(grad_of(out["loss"], student), g_ref, rtol=1e-4, atol=1e-6)


def test_jsd_end_points_follow_trl_and_skews_reduce_to_kl():
    student, teacher, labels = make_batch(seed=2)
    s, t = torch.log_softmax(student.detach(), -1), torch.log_softmax(teacher, -1)
    fkl, rkl = dense_divergence(s, t, "fkl"), dense_divergence(s, t, "rkl")
    assert not torch.allclose(fkl, rkl)
    torch.testing.assert_close(dense_divergence(s, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(dense_divergence(s, t, "jsd", beta=1.0), rkl)
    torch.testing.assert_close(dense_divergence(s, t, "skl", alpha=0.0), fkl)
    torch.testing.assert_close(dense_divergence(s, t, "srkl", alpha=0.0), rkl)


# ---- properties ---------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_zero_for_equal_distributions(loss, temp):
    student, _, labels = make_batch(seed=3)
    dense = distillation_loss(
        student, labels, teacher_logits=student.detach() + 1.5, loss=loss, temperature=temp, **HP
    )
    assert abs(dense["kd"].item()) < 1e-6
    ids, lp = topk_of(student)  # the student's own top-k at T = 1
    sparse = distillation_loss(
        student,
        labels,
        teacher_topk_ids=ids,
        teacher_topk_logprobs=lp,
        loss=loss,
        temperature=temp,
        **HP,
    )
    assert abs(sparse["kd"].item()) < 1e-6


def test_jsd_symmetric_at_half_and_bounded_by_log2():
    student, teacher, _ = make_batch(seed=4, scale=5.0)
    s, t = torch.log_softmax(student.detach(), -1), torch.log_softmax(teacher, -1)
    jsd = dense_divergence(s, t, "jsd", beta=0.5)
    torch.testing.assert_close(jsd, dense_divergence(t, s, "jsd", beta=0.5))
    assert not torch.allclose(
        dense_divergence(s, t, "jsd", beta=0.2), dense_divergence(t, s, "jsd", beta=0.2)
    )
    assert (jsd <= math.log(2) + 1e-6).all() and (jsd > 0).all()
    # disjoint supports reach the bound
    a = torch.full((V,), -1e4)
    b = a.clone()
    a[0], b[1] = 0.0, 0.0
    far = dense_divergence(torch.log_softmax(a, -1), torch.log_softmax(b, -1), "jsd", beta=0.5)
    assert far.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_sparse_with_full_vocab_equals_dense(loss, temp):
    student, teacher, labels = make_batch(seed=5)
    ids, lp = topk_of(teacher, k=V)
    kw = {"loss": loss, "temperature": temp, **HP}
    dense = distillation_loss(student, labels, teacher_logits=teacher, **kw)
    sparse = distillation_loss(
        student, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lp, **kw
    )
    assert sparse["kd"].item() == pytest.approx(dense["kd"].item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(
        grad_of(sparse["loss"], student), grad_of(dense["loss"], student), rtol=1e-4, atol=1e-6
    )
    # the per-token building blocks agree as well
    per_tok = sparse_divergence(student, ids, lp, loss, temperature=temp, **HP)
    s = torch.log_softmax(student / temp, -1)
    t = torch.log_softmax(teacher / temp, -1)
    torch.testing.assert_close(per_tok, dense_divergence(s, t, loss, **HP), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_finite_gradients_with_extreme_and_masked_logits(loss):
    student, teacher, labels = make_batch(seed=6, scale=1e4)
    with torch.no_grad():
        student[..., -3:] = -math.inf  # e.g. padded vocabulary rows, masked in both models
        teacher[..., -3:] = -math.inf
    labels = labels.clamp(max=V - 4).masked_fill(labels == -100, -100)
    ids_k, lp_k = topk_of(teacher)
    ids_v, lp_v = topk_of(teacher, k=V)  # includes the -inf entries
    assert torch.isinf(lp_v).any()
    teachers = [
        {"teacher_logits": teacher},
        {"teacher_topk_ids": ids_k, "teacher_topk_logprobs": lp_k},
        {"teacher_topk_ids": ids_v, "teacher_topk_logprobs": lp_v},
    ]
    for teacher_kw in teachers:
        for temp in (1.0, 2.0):
            out = distillation_loss(
                student, labels, loss=loss, temperature=temp, ce_ratio=0.5, **teacher_kw, **HP
            )
            assert all(torch.isfinite(v) for v in out.values()), (teacher_kw.keys(), out)
            g = grad_of(out["loss"], student)
            assert torch.isfinite(g).all()
            assert g.abs().sum() > 0


def vllm_style_students(vocab: int) -> torch.Tensor:
    """[1, N, vocab] student logits: random at several scales, and confident on a teacher top-k
    id, on a tail id, or split between the two (where reverse KL's tail term is largest)."""
    g = torch.Generator().manual_seed(15)
    rows = [torch.randn(vocab, generator=g) * scale for scale in (0, 1, 3, 10, 30, 100)]
    for c in (5.0, 20.0, 80.0):
        for hot in ((3,), (50,), (3, 50)):
            z = torch.zeros(vocab)
            z[list(hot)] = c
            rows.append(z)
    return torch.stack(rows)[None]


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize(
    ("loss", "beta"),
    [(name, 0.5) for name in LOSS_NAMES if name != "jsd"]
    + [("jsd", beta) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)],
)
def test_vllm_style_float32_topk_is_finite_with_bounded_gradients(loss, beta, temp):
    """vLLM returns exactly 0.0 for the top token of a confident position, so in float32
    1 - sum(exp(top-k)) <= 0: an unfloored tail made rkl and jsd(beta=1) ~1e30 (values and
    gradients). With the tail floored, every loss stays finite and each token's gradient is
    bounded (|d kd / d logit| <= 10 T here; it scales with T, see T^2 and 1/T)."""
    vocab, k = 64, 4
    students = vllm_style_students(vocab)
    n = students.shape[1]
    ids = torch.tensor([3, 7, 11, 12]).expand(1, n, k)
    lp = torch.tensor([0.0, -20.0, -21.0, -22.0]).expand(1, n, k)
    labels = torch.zeros(1, n, dtype=torch.long)
    # Without a stored tail (derived from the top-k), and with the cache's: log(0) = -inf.
    for tail in (None, torch.full((1, n), -math.inf)):
        student = students.clone().requires_grad_()
        out = distillation_loss(
            student,
            labels,
            teacher_topk_ids=ids,
            teacher_topk_logprobs=lp,
            teacher_topk_tail=tail,
            loss=loss,
            beta=beta,
            temperature=temp,
            chunk_size=5,
        )
        assert torch.isfinite(out["kd"]) and out["kd"] < 1e3, out
        g = grad_of(out["kd"], student) * n  # per token: kd is a mean over n tokens
        assert torch.isfinite(g).all()
        assert g.abs().max() <= 10 * temp, g.abs().max()


def test_stored_tail_is_used_and_floored():
    """The tail given with the top-k is the teacher's tail bucket (not 1 - sum of the top-k),
    floored at TAIL_FLOOR when k < vocabulary."""
    student, teacher, labels = make_batch(seed=16)
    ids, lp = topk_of(teacher)
    derived = (1 - lp.double().exp().sum(-1)).clamp(min=0).log()
    stored = derived - 1.0  # a teacher whose tail is e times smaller than its top-k implies
    for loss in ("fkl", "rkl", "jsd"):
        out = distillation_loss(
            student, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
            teacher_topk_tail=stored, loss=loss, temperature=2.0, **HP,
        )  # fmt: skip
        q = torch.softmax(student.double(), -1).gather(-1, ids)
        qb = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1) ** 0.5
        pb = torch.cat([lp.double().exp(), stored.exp()[..., None]], -1) ** 0.5
        qb, pb = qb / qb.sum(-1, keepdim=True), pb / pb.sum(-1, keepdim=True)
        ref = 4 * ref_div(pb, qb, loss, **HP)[labels != -100].mean()
        assert out["kd"].item() == pytest.approx(ref.item(), rel=1e-5)
        plain = distillation_loss(
            student, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lp, loss=loss,
            temperature=2.0, **HP,
        )  # fmt: skip
        assert abs(plain["kd"].item() - ref.item()) > 1e-3  # the stored tail made a difference
    # An empty tail (log 0) and one below the floor are both the floor.
    floor = torch.full(labels.shape, math.log(TAIL_FLOOR))
    kw = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp, loss="rkl")
    at_floor = distillation_loss(student, labels, teacher_topk_tail=floor, **kw)["kd"]
    for below in (-math.inf, math.log(TAIL_FLOOR) - 5):
        tail = torch.full(labels.shape, below)
        assert distillation_loss(student, labels, teacher_topk_tail=tail, **kw)["kd"] == at_floor
    with pytest.raises(ValueError, match="teacher_topk_tail shape"):
        distillation_loss(student, labels, teacher_topk_tail=floor[:, :-1], **kw)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_all_masked_batch_is_zero_without_nan(loss):
    student, teacher, labels = make_batch(seed=7)
    labels = torch.full_like(labels, -100)
    ids, lp = topk_of(teacher)
    for teacher_kw in (
        {"teacher_logits": teacher},
        {"teacher_topk_ids": ids, "teacher_topk_logprobs": lp},
    ):
        out = distillation_loss(student, labels, loss=loss, ce_ratio=0.5, **teacher_kw)
        assert [out[k].item() for k in ("loss", "kd", "ce")] == [0.0, 0.0, 0.0]
        g = grad_of(out["loss"], student)
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_chunking_gives_same_value_and_gradient(loss):
    student, teacher, labels = make_batch(seed=8)
    ids, lp = topk_of(teacher)
    for teacher_kw in (
        {"teacher_logits": teacher},
        {"teacher_topk_ids": ids, "teacher_topk_logprobs": lp},
    ):
        kw = {"loss": loss, "temperature": 2.0, "ce_ratio": 0.3, **teacher_kw, **HP}
        whole = distillation_loss(student, labels, chunk_size=4096, **kw)
        g_whole = grad_of(whole["loss"], student)
        for chunk in (1, 3):
            part = distillation_loss(student, labels, chunk_size=chunk, **kw)
            for key in ("loss", "kd", "ce"):
                torch.testing.assert_close(part[key], whole[key], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                grad_of(part["loss"], student),
                g_whole,
                rtol=1e-5,
                atol=1e-7,
            )


@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(sparse):
    student, teacher, labels = make_batch(seed=9, dtype=torch.float64)
    student = student[:, :3, :6].detach().clone().requires_grad_()
    teacher, labels = (
        teacher[:, :3, :6],
        labels[:, :3].clamp(max=5).masked_fill(labels[:, :3] < 0, -100),
    )
    ids, lp = topk_of(teacher, k=3)
    teacher_kw = (
        {"teacher_topk_ids": ids, "teacher_topk_logprobs": lp.double()}
        if sparse
        else {"teacher_logits": teacher}
    )
    for loss in LOSS_NAMES:

        def fn(x, loss=loss):
            out = distillation_loss(
                x,
                labels,
                loss=loss,
                temperature=1.7,
                ce_ratio=0.3,
                chunk_size=2,
                **teacher_kw,
                **HP,
            )
            return out["loss"], out["kd"], out["ce"]

        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6), loss


def test_temperature_squared_scaling_and_ce_mix():
    student, teacher, labels = make_batch(seed=10)
    hot = distillation_loss(student, labels, teacher_logits=teacher, temperature=2.0, ce_ratio=0.3)
    cold = distillation_loss(student / 2, labels, teacher_logits=teacher / 2, temperature=1.0)
    assert hot["kd"].item() == pytest.approx(4 * cold["kd"].item(), rel=1e-5)
    ce = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert hot["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert hot["loss"].item() == pytest.approx(0.3 * ce.item() + 0.7 * hot["kd"].item(), rel=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ce_only_equals_cross_entropy(ignore_index):
    student, _, labels = make_batch(seed=11)
    labels = labels.masked_fill(labels == -100, ignore_index)
    out = distillation_loss(student, labels, ce_ratio=1.0, ignore_index=ignore_index, chunk_size=4)
    ref = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert out["kd"].item() == 0.0
    torch.testing.assert_close(grad_of(out["loss"], student), grad_of(ref, student))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_masked_positions_are_ignored(loss):
    student, teacher, labels = make_batch(seed=12)
    ids, lp = topk_of(teacher)
    masked = labels == -100
    student2 = student.detach().clone()
    student2[masked] = torch.randn(int(masked.sum()), V) * 100
    student2[0, 0, 3] = math.nan
    student2.requires_grad_()
    teacher2, ids2, lp2 = teacher.clone(), ids.clone(), lp.clone()
    teacher2[masked] = math.nan
    ids2[masked] = ids2[masked].flip(-1)
    lp2[masked] = -0.01
    pairs = [
        ({"teacher_logits": teacher}, {"teacher_logits": teacher2}),
        (
            {"teacher_topk_ids": ids, "teacher_topk_logprobs": lp},
            {"teacher_topk_ids": ids2, "teacher_topk_logprobs": lp2},
        ),
    ]
    for kw1, kw2 in pairs:
        a = distillation_loss(student, labels, loss=loss, ce_ratio=0.4, **kw1)
        b = distillation_loss(student2, labels, loss=loss, ce_ratio=0.4, **kw2)
        assert a["loss"].item() == b["loss"].item()
        ga, gb = grad_of(a["loss"], student), grad_of(b["loss"], student2)
        assert torch.equal(gb[masked], torch.zeros_like(gb[masked]))
        torch.testing.assert_close(ga, gb)


def test_bf16_logits_compute_in_float32():
    student, teacher, labels = make_batch(seed=13)
    ref = distillation_loss(student, labels, teacher_logits=teacher, loss="jsd", ce_ratio=0.5)
    sb = student.detach().bfloat16().requires_grad_()
    out = distillation_loss(sb, labels, teacher_logits=teacher.bfloat16(), loss="jsd", ce_ratio=0.5)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)
    g = grad_of(out["loss"], sb)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


def test_kd_loss_is_per_token_and_scaled():
    student, teacher, labels = make_batch(seed=14)
    per_tok = kd_loss(student, teacher_logits=teacher, loss="rkl", temperature=3.0)
    assert per_tok.shape == (B, T)
    keep = labels != -100
    out = distillation_loss(student, labels, teacher_logits=teacher, loss="rkl", temperature=3.0)
    assert out["kd"].item() == pytest.approx(per_tok[keep].mean().item(), rel=1e-6)


# ---- errors -------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    student, teacher, labels = make_batch()
    ids, lp = topk_of(teacher)
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        distillation_loss(student, labels, teacher_logits=teacher, loss="kl")
    with pytest.raises(ValueError, match="unknown distillation loss"):
        dense_divergence(student, teacher, "nope")
    with pytest.raises(ValueError, match="labels shape"):
        distillation_loss(student, labels[:, :-1], teacher_logits=teacher)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        distillation_loss(student, labels, teacher_logits=teacher[:, :-1])
    with pytest.raises(ValueError, match=f"student has {V} logits, teacher has {V + 4}"):
        distillation_loss(student, labels, teacher_logits=F.pad(teacher, (0, 4)))
    with pytest.raises(ValueError, match=rf"\[0, {V}\)"):
        distillation_loss(student, labels, teacher_topk_ids=ids + V - 1, teacher_topk_logprobs=lp)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(student, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lp[..., :-1])
    with pytest.raises(ValueError, match="top-k shape"):
        distillation_loss(
            student, labels, teacher_topk_ids=ids[:, :-1], teacher_topk_logprobs=lp[:, :-1]
        )
    with pytest.raises(ValueError, match="not both"):
        distillation_loss(
            student, labels, teacher_logits=teacher, teacher_topk_ids=ids, teacher_topk_logprobs=lp
        )
    with pytest.raises(ValueError, match="teacher is required"):
        distillation_loss(student, labels, ce_ratio=0.5)
    with pytest.raises(ValueError, match="labels must be in"):
        distillation_loss(student, labels.clamp(min=0) + V, ce_ratio=1.0)
    for bad in (
        {"temperature": 0.0},
        {"beta": 1.5},
        {"alpha": -0.1},
        {"ce_ratio": 2.0},
        {"chunk_size": 0},
    ):
        with pytest.raises(ValueError):
            distillation_loss(student, labels, teacher_logits=teacher, **bad)
