"""CUR math on small matrices against known answers."""
import math

import pytest
import torch

from modules import registry
from modules import cur_math

from modules.cur_linear import CURLinear, GradCURLinear
from modules.cur_math import (cur_decompose, leverage_scores,
                              safe_svd, scaled_weight, select_indices, uniform_indices)


def low_rank(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("u_mode", ["pinv", "act_weighted"])
@pytest.mark.parametrize("act_aware", [False, True])
def test_exact_rank_k_matrix_is_reproduced(u_mode, act_aware):
    W = low_rank(40, 30, 5)
    scale = torch.rand(30, dtype=torch.float64) + 0.1 if act_aware else None
    f = cur_decompose(W, 5, scale=scale, u_mode=u_mode)
    assert f.rank == 5 and f.fallback == ""
    assert torch.allclose(f.C, W[:, f.cols]) and torch.allclose(f.R, W[f.rows, :])  # actual columns/rows
    err = (f.C @ f.U @ f.R - W).norm() / W.norm()
    assert err < 1e-10


def test_lower_rank_than_matrix_is_not_exact_but_better_with_more_rank():
    W = low_rank(40, 30, 12)
    errs = [(lambda f: ((f.C @ f.U @ f.R) - W).norm() / W.norm())(cur_decompose(W, k)) for k in (4, 8, 12)]
    assert errs[0] > 1e-3 and errs[2] < 1e-9


def test_leverage_scores_sum_to_one_and_match_definition():
    W = torch.randn(20, 15, dtype=torch.float64)
    svd = safe_svd(W)
    for k in (1, 3, 15):
        pi = leverage_scores(svd.Vh.T, k)
        assert math.isclose(pi.sum().item(), 1.0, rel_tol=1e-12)
        j = 4
        assert math.isclose(pi[j].item(), sum(svd.Vh[x, j].item() ** 2 for x in range(k)) / k, rel_tol=1e-12)
    assert math.isclose(leverage_scores(svd.U, 5).sum().item(), 1.0, rel_tol=1e-12)


def test_topk_selection_takes_highest_scores_sorted():
    scores = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    assert select_indices(scores, 2).tolist() == [1, 3]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = select_indices(scores, 3, "sample", g1)
    assert a.tolist() == select_indices(scores, 3, "sample", g2).tolist()
    assert len(set(a.tolist())) == 3


@pytest.mark.parametrize("m,n", [(64, 64), (128, 48), (48, 128), (576, 1536), (7, 5)])
@pytest.mark.parametrize("align", [1, 8, 32])
def test_rank_for_ratio_respects_budget_and_alignment(m, n, align):
    for ratio in (0.05, 0.3, 0.5, 0.8, 0.9, 1.0):
        k = registry.get("acur").rank(m, n, ratio, align)
        assert 1 <= k <= min(m, n)
        if k > 1 or registry.get("acur").param_count(m, n, 1) <= ratio * m * n:
            assert registry.get("acur").param_count(m, n, k) <= ratio * m * n  # C + U + R counted
        aligned_possible = registry.get("acur").param_count(m, n, align) <= ratio * m * n and align <= min(m, n)
        if aligned_possible:
            assert k % align == 0
            nxt = k + align  # maximal: the next aligned rank would break the budget
            assert nxt > min(m, n) or registry.get("acur").param_count(m, n, nxt) > ratio * m * n


def test_rank_for_ratio_rejects_bad_ratio():
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            registry.get("acur").rank(10, 10, bad)


def test_nan_scale_takes_uniform_fallback_and_records_it():
    W = low_rank(30, 20, 4)
    scale = torch.ones(20, dtype=torch.float64)
    scale[3] = float("nan")
    f = cur_decompose(W, 4, scale=scale)
    assert "uniform" in f.fallback
    assert f.cols.tolist() == uniform_indices(20, 4).tolist()
    assert f.rows.tolist() == uniform_indices(30, 4).tolist()
    assert torch.isfinite(f.U).all()


def test_nan_weight_is_an_error_not_a_silent_result():
    W = low_rank(10, 8, 2)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cur_decompose(W, 2)


def test_scaled_weight_applies_alpha():
    W = torch.ones(2, 3)
    s = torch.tensor([1.0, 4.0, 9.0])
    out = scaled_weight(W, s, 0.5)
    assert torch.allclose(out[0], torch.tensor([1.0, 2.0, 3.0]), atol=1e-5)


def test_curlinear_forward_equals_cur_product_plus_bias():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    cur = CURLinear.from_linear(lin, 0.6, act_scale=torch.rand(24) + 0.1)
    x = torch.randn(3, 5, 24)
    expected = x @ (cur.C @ cur.U @ cur.R).T + cur.bias
    assert torch.allclose(cur(x), expected, atol=1e-5)
    assert cur.param_count() == registry.get("acur").param_count(16, 24, cur.rank) <= 0.6 * 16 * 24
    assert cur.col_indices.numel() == cur.rank and cur.row_indices.numel() == cur.rank
    assert torch.equal(cur.C.data, lin.weight.data[:, cur.col_indices])  # actual columns kept


def test_curlinear_on_exact_low_rank_layer_reproduces_outputs():
    lin = torch.nn.Linear(30, 40, bias=False)
    lin.weight.data = low_rank(40, 30, 3).float()
    cur = CURLinear.from_linear(lin, 0.5)
    x = torch.randn(8, 30)
    assert torch.allclose(cur(x), lin(x), atol=1e-3 * lin(x).abs().max().item())


def test_gradcurlinear_matches_curlinear_and_passes_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 12)
    g = GradCURLinear.from_linear(lin, 0.7)
    c = CURLinear.from_linear(lin, 0.7)
    x = torch.randn(4, 20)
    assert torch.allclose(g(x), c(x), atol=1e-4)
    g(x).pow(2).sum().backward()
    assert g.weight.grad is not None and torch.isfinite(g.weight.grad).all() and g.weight.grad.abs().sum() > 0


def test_pinv_solve_equals_pinv_on_full_rank_and_falls_back_when_rank_deficient():
    g = torch.Generator().manual_seed(11)
    A, B = torch.randn(60, 20, generator=g), torch.randn(60, 7, generator=g)
    A[:, 3] *= 1e3  # very different column norms are not rank deficiency: the QR path still applies
    ref = torch.linalg.pinv(A.double()) @ B.double()
    got = cur_math.pinv_solve(A, B)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-6)
    A[:, 5] = 2 * A[:, 6]  # dependent column: QR's triangle is singular, the truncating pinv is used
    got = cur_math.pinv_solve(A, B)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.linalg.pinv(A) @ B, atol=1e-5)
    wide = torch.randn(5, 9, generator=g)
    assert torch.allclose(cur_math.pinv_solve(wide, torch.eye(5)), torch.linalg.pinv(wide), atol=1e-5)


def test_compute_u_equals_pinv_formula():
    g = torch.Generator().manual_seed(12)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    C, R = W[:, [0, 4, 9, 17]], W[[1, 2, 30, 33], :]
    s = torch.rand(30, generator=g, dtype=torch.float64) + 0.5
    assert torch.allclose(cur_math.compute_u(W, C, R), torch.linalg.pinv(C) @ W @ torch.linalg.pinv(R))
    assert torch.allclose(cur_math.compute_u(W, C, R, "act_weighted", s),
                          torch.linalg.pinv(C) @ (W * s) @ torch.linalg.pinv(R * s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 2049])
def test_in_place_covariance_preparation_equals_the_expression_form_bit_for_bit(n, dtype):
    """Shrinkage, symmetrisation and damping run in place on one fp64 copy (a 70B down_proj's covariance
    is 6.6 GB: the expression form held five at once); the result is the textbook expression exactly,
    n = 2049 crosses the symmetrisation's tile edge, and the caller's matrix is left as it was."""
    from modules import decompositions as dec
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n + 3, generator=g, dtype=dtype)
    cov = A @ A.T / n + 1e-3 * torch.randn(n, n, generator=g, dtype=dtype)  # not exactly symmetric
    before = cov.clone()
    for damp in (0.0, 0.01):
        c = cov.double()
        c = (c + c.T) / 2
        damped = c + damp * float(c.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
        assert torch.equal(dec.damped_covariance(cov, damp), damped)
        lam = dec.shrinkage(n, 777)
        s = (1 - lam) * cov.double() + lam * torch.diag_embed(cov.double().diagonal())
        s = (s + s.T) / 2
        shrunk = s + damp * float(s.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
        assert torch.equal(dec.shrunk_covariance(cov, 777, damp), shrunk)
    assert torch.equal(cov, before)


def test_all_finite_by_slabs_finds_one_bad_entry_anywhere():
    from modules import decompositions as dec
    t = torch.zeros(3000, 5, dtype=torch.float64)
    assert dec.all_finite(t) and dec.all_finite(torch.zeros(3)) and dec.all_finite(torch.zeros(0, 4))
    for where, bad in (((0, 0), math.nan), ((2999, 4), math.inf), ((1500, 2), -math.inf)):
        u = t.clone()
        u[where] = bad
        assert not dec.all_finite(u) and not dec.all_finite(u.cuda() if torch.cuda.is_available() else u.T)


def test_pick_state_cache_keeps_a_7b_blocks_grams_and_drops_a_70b_gate_gram_for_the_next_shape():
    """The cached pivoted-Cholesky states (CUDA graphs with their fp64 Grams) are reused across layers; a
    70B gate_proj's Gram (6.1 GiB) must not stay resident while down_proj's fit reaches the stage's peak."""
    from types import SimpleNamespace
    from modules import decompositions as dec

    def state(m):  # the cache reads only the Gram's size
        return SimpleNamespace(G=torch.zeros(1, dtype=torch.float64).expand(m, m))  # m x m, no memory

    def use(cache, m):
        if m not in cache:
            dec.make_room(cache, m * m * 8)
            cache[m] = state(m)

    cache = {}
    for m in (4096, 4096, 11008, 11008, 4096) * 3:  # a 7B block's row-pick shapes, three blocks
        use(cache, m)
    assert list(cache) == [4096, 11008]  # nothing dropped: no re-capture at 7B
    cache = {}
    for m in (8192, 1024, 8192, 28672, 28672):  # 70B: q, k, o, gate, up
        use(cache, m)
    assert list(cache) == [28672]  # the small states made room; gate and up share one
    use(cache, 8192)  # down_proj
    assert list(cache) == [8192]  # the 6.1 GiB Gram is gone before down_proj's fit
    cache = {m: state(m) for m in (1, 2, 3, 4)}
    use(cache, 5)
    assert list(cache) == [2, 3, 4, 5]  # the count cap as before
