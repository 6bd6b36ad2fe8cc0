"""Structured CUR math: which whole channels of a block to keep, and the refit of the layer that reads them.

Pure torch on tensors (the model walk is structured.py's). The setting: a block part ends in y = W h, where
h (n channels) is what the block computes before its last linear W (m x n): an MLP's intermediate
activations (one channel per neuron) or an attention's concatenated head outputs. Keeping the channels S
keeps the rows of the layers that produce them (gate/up, q/k/v) and the columns S of W: a CUR of the block
whose C and R are actual columns and rows, and whose U is the refit of W on the kept activations,

    W' = W X[:, S] C[S, S]^-1,   C = E[h~ h~^T],  X = E[h h~^T]  (X = C when h~ = h)

the least-squares map from the kept activations to the full output (MoDeGPT's Nystrom approximation,
arXiv 2408.09632). h~ is what the already-compressed model feeds the block, h the dense model's: with X
the refit also undoes the earlier blocks' error. Channels come in equal groups (one neuron; one KV group =
its key/value heads and all their query heads), given as a (G, s) index tensor.

Which groups to keep (the error is E||B (W'_all h~ - W'_S h~_S)||^2, B = diag(sqrt(g)) weighting each output
by the loss's sensitivity to it, so errors are in nats):
  greedy    backward elimination: repeatedly drop the group whose removal raises the refitted error least.
            With P = C^-1 and the current refit W', dropping R costs exactly tr(B W'_R P_RR^-1 W'_R^T B)
            (the optimal-brain-surgeon step); P and W' are then updated in closed form. One pass gives the
            exact error at every kept count.
  leverage  ridge leverage diag(C (C + lam I)^-1) of each channel, summed over its group (MoDeGPT).

Intercept (the refitted layer gains a bias b): a removed channel's mean contribution W_R E[h_R] is lost by
the refit above; regressing W h on [h~_S, 1] instead absorbs it. The constant column's normal equations
eliminate to the same formulas on centred moments (the Schur complement of the augmented Gram):

    W' = W Xc[:, S] Sc[S, S]^-1,   b = W E[h] - W' E[h~_S],   Sc = C - E[h~] E[h~]^T,  Xc = X - E[h] E[h~]^T

and the error of keeping S is the one above with Sc for C, so every function here serves both: the caller
passes the centred moments (centered) and adds intercept(...) as the bias. Damping Sc by lam I equals
damping C and then centring (the Schur complement of [[C + lam I, m], [m^T, 1]]).

The caller passes C already damped (modules.decompositions.damped_covariance), so C is invertible and
keeping every channel reproduces W exactly. Work is in fp64 on the inputs' device.
"""
from __future__ import annotations

import torch

SELECTIONS = ("greedy", "leverage")


def channel_groups(n_groups: int, size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """(G, s) channel indices of G consecutive groups of s channels (neurons: s = 1)."""
    return torch.arange(n_groups * size, device=device).view(n_groups, size)


def kv_group_channels(n_kv: int, heads_per_group: int, head_dim: int,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query channels (G, r*d), key/value channels (G, d)) of the G = n_kv KV groups of a grouped-query
    attention: group g owns KV head g and query heads g*r .. g*r + r-1 (the query channels are also the
    columns of o_proj that read those heads' outputs)."""
    q = channel_groups(n_kv, heads_per_group * head_dim, device)
    return q, channel_groups(n_kv, head_dim, device)


def _solve_right(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """rhs @ gram^-1 for a symmetric positive definite gram (pseudo-inverse when it is singular)."""
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, L).T
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def _inverse(gram: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    return torch.linalg.pinv(gram, hermitian=True)


def _f64(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float64)


def refit(weight: torch.Tensor, cov: torch.Tensor, kept: torch.Tensor,
          target: torch.Tensor | None = None) -> torch.Tensor:
    """W' = W X[:, S] C[S, S]^-1 (fp64, m x |S|): the least-squares map from the kept channels h~_S to W h.

    cov: C = E[h~ h~^T] (damped by the caller); target: X = E[h h~^T] (None: X = C, i.e. h = h~)."""
    W = weight.detach().double()
    C = _f64(cov, W.device)
    X = C if target is None else _f64(target, W.device)
    kept = kept.to(W.device)
    return _solve_right(C[kept][:, kept], W @ X[:, kept])


def refit_error(weight: torch.Tensor, cov: torch.Tensor, kept: torch.Tensor, target: torch.Tensor | None = None,
                row_weight: torch.Tensor | None = None) -> float:
    """E||B (W'_all h~ - W'_S h~_S)||^2: how much more output error keeping only S costs than keeping all
    (B = diag(sqrt(row_weight))). With target None this is the refitted error E||B (W h - W'_S h_S)||^2."""
    W = weight.detach().double()
    C = _f64(cov, W.device)
    full = refit(W, C, torch.arange(C.shape[0], device=W.device), target)
    part = refit(W, C, kept, target)
    kept = kept.to(W.device)
    energy = ((full @ C) * full).sum(1) - ((part @ C[kept][:, kept]) * part).sum(1)  # per output
    g = torch.ones_like(energy) if row_weight is None else _f64(row_weight, W.device).clamp_min(0)
    return float((g * energy).sum())


def centered(moment: torch.Tensor, mean: torch.Tensor, other_mean: torch.Tensor | None = None) -> torch.Tensor:
    """E[(h - E h)(h~ - E h~)^T] (fp64) from E[h h~^T] and the means (other_mean = E[h~]; None: h~ = h):
    the moment the intercept refit reads in place of the uncentred one."""
    M = moment.detach().double()
    a = _f64(mean, M.device)
    b = a if other_mean is None else _f64(other_mean, M.device)
    return M - torch.outer(a, b)


def intercept(weight: torch.Tensor, refitted: torch.Tensor, kept: torch.Tensor, mean: torch.Tensor,
              target_mean: torch.Tensor | None = None) -> torch.Tensor:
    """b = W E[h] - W' E[h~_S] (fp64, m): the bias that restores the mean output the refit on the kept channels
    misses. mean: E[h~] (what the refit reads); target_mean: E[h] of the dense inputs (None: h = h~)."""
    W = weight.detach().double()
    mu = _f64(mean, W.device)
    mu_d = mu if target_mean is None else _f64(target_mean, W.device)
    return W @ mu_d - _f64(refitted, W.device) @ mu[kept.to(W.device)]


def _start(weight: torch.Tensor, cov: torch.Tensor, target: torch.Tensor | None,
           row_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P = C^-1, B W'_all): the state backward elimination starts from (W'_all = W when target is None)."""
    W = weight.detach().double()
    C = _f64(cov, W.device)
    P = _inverse(C)
    Wt = W if target is None else W @ _f64(target, W.device) @ P
    if row_weight is not None:
        Wt = Wt * _f64(row_weight, W.device).clamp_min(0).sqrt().unsqueeze(1)
    return P, Wt


def greedy_removal(weight: torch.Tensor, cov: torch.Tensor, n_remove: int, groups: torch.Tensor | None = None,
                   target: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
                   block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(removed groups in removal order (n_remove,), error after each removal (n_remove + 1,), error[0] = 0).

    Backward elimination: each step drops the group whose removal raises E||B (W'_all h~ - W'_S h~_S)||^2 the
    least, given the refit of W on what stays. The error values are exact (refit_error of each kept set).
    groups: (G, s) channel indices (None: every channel its own group)."""
    P, Wt = _start(weight, cov, target, row_weight)
    n = P.shape[0]
    if groups is None or groups.shape[1] == 1:
        order = None if groups is None else groups.to(P.device).flatten()
        if order is not None and not torch.equal(order, torch.arange(n, device=P.device)):
            P, Wt = P[order][:, order], Wt[:, order]
        return _eliminate_channels(P, Wt, n_remove, block)  # positions in `order` = group indices
    return _eliminate_groups(P, Wt, groups.to(P.device), n_remove)


def _eliminate_channels(P: torch.Tensor, Wt: torch.Tensor, n_remove: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward elimination of single channels with blocked updates (GPTQ-style lazy batches).

    Within a batch of b removals, P_res = P - U U^T and W'_res = W' - V U^T are kept implicitly; only the
    diagonal of P_res and the column norms of W'_res (what the scores read) are updated per step, with one
    matrix-vector product of W'. After the batch, P and W' take the b updates at once (two GEMMs)."""
    n = P.shape[0]
    n_remove = min(n_remove, n)
    dev = P.device
    d = P.diagonal().clone()          # diag of P_res
    q = Wt.pow(2).sum(0)              # ||W'_res[:, j]||^2
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    removed = torch.empty(n_remove, dtype=torch.long, device=dev)
    err = torch.zeros(n_remove + 1, dtype=torch.float64, device=dev)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    done = 0
    while done < n_remove:
        b = min(block, n_remove - done)
        U = P.new_zeros(n, b)
        V = Wt.new_zeros(Wt.shape[0], b)
        for i in range(b):
            score = torch.where(alive, q.clamp_min(0) / d.clamp_min(1e-300), inf)
            p = torch.argmin(score)
            col = P[:, p] - U[:, :i] @ U[p, :i]          # column p of P_res
            w = Wt[:, p] - V[:, :i] @ U[p, :i]           # column p of W'_res
            root = col[p].clamp_min(1e-300).sqrt()
            u, v = col / root, w / root
            wv = Wt.T @ v - U[:, :i] @ (V[:, :i].T @ v)  # W'_res^T v
            q = q - 2 * u * wv + u * u * (v @ v)
            d = d - u * u
            U[:, i], V[:, i] = u, v
            alive[p] = False
            removed[done + i] = p
            err[done + i + 1] = err[done + i] + score[p]
        P = P - U @ U.T
        Wt = Wt - V @ U.T
        done += b
    return removed, err


def _eliminate_groups(P: torch.Tensor, Wt: torch.Tensor, groups: torch.Tensor,
                      n_remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward elimination of whole groups (KV groups): every step scores all groups at once (batched
    s x s solves) and applies the block OBS update of the cheapest. G is small (the KV heads), so the
    updates are done explicitly."""
    G, s = groups.shape
    n_remove = min(n_remove, G)
    dev = P.device
    eye = torch.eye(s, dtype=P.dtype, device=dev)
    alive = torch.ones(G, dtype=torch.bool, device=dev)
    removed = torch.empty(n_remove, dtype=torch.long, device=dev)
    err = torch.zeros(n_remove + 1, dtype=torch.float64, device=dev)
    for t in range(n_remove):
        Pg = torch.where(alive.view(G, 1, 1), P[groups.unsqueeze(2), groups.unsqueeze(1)], eye)  # (G, s, s)
        Wg = Wt[:, groups].permute(1, 2, 0)                                                        # (G, s, m)
        L, _ = torch.linalg.cholesky_ex(Pg)
        score = torch.linalg.solve_triangular(L, Wg, upper=False).pow(2).sum((1, 2))  # tr(W'_g P_gg^-1 W'_g^T)
        score = torch.where(alive & torch.isfinite(score), score, torch.full_like(score, float("inf")))
        p = int(torch.argmin(score))
        R = groups[p]
        K = torch.linalg.solve(P[R][:, R], P[R, :])  # P_RR^-1 P_R:
        Wt = Wt - Wt[:, R] @ K
        P = P - P[:, R] @ K
        P[R, :], P[:, R], Wt[:, R] = 0, 0, 0
        alive[p] = False
        removed[t] = p
        err[t + 1] = err[t] + score[p]
    return removed, err


def ridge_leverage(cov: torch.Tensor, lam: float) -> torch.Tensor:
    """diag(C (C + lam I)^-1) (fp64): how much of each channel the others cannot explain (MoDeGPT's score)."""
    C = cov.detach().double()
    P = _inverse(C + lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
    return (C * P).sum(1)


def leverage_removal(cov: torch.Tensor, n_remove: int, lam: float,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """Groups in removal order, lowest summed ridge leverage first (cov: the undamped C)."""
    lev = ridge_leverage(cov, lam)
    per_group = lev.unsqueeze(1) if groups is None else lev[groups.to(lev.device)]
    return torch.argsort(per_group.sum(1), stable=True)[:n_remove]


def removal_curve(weight: torch.Tensor, cov: torch.Tensor, removed: torch.Tensor, groups: torch.Tensor | None = None,
                  target: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Error after each removal of a fixed removal order ((len(removed) + 1,), first 0), exact.

    Dropping the channels R costs tr(B W'_R P_RR^-1 W'_R^T B) = ||L^-1 (B W'_R)^T||^2 with P_RR = L L^T; L^-1
    is lower triangular, so its rows give the cost of every prefix of R: one Cholesky for the whole curve."""
    P, Wt = _start(weight, cov, target, row_weight)
    removed = removed.to(P.device)
    cols = removed.unsqueeze(1) if groups is None else groups.to(P.device)[removed]
    idx = cols.flatten()
    L, info = torch.linalg.cholesky_ex(P[idx][:, idx])
    if int(info) != 0:
        raise ValueError("removal_curve: the inverse covariance is not positive definite (damp it)")
    rows = torch.linalg.solve_triangular(L, Wt[:, idx].T, upper=False).pow(2).sum(1)
    per_group = rows.view(len(removed), cols.shape[1]).sum(1)
    return torch.cat([per_group.new_zeros(1), per_group.cumsum(0)])


def select(weight: torch.Tensor, cov: torch.Tensor, keep: int, groups: torch.Tensor | None = None,
           selection: str = "greedy", target: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
           lam: float = 0.0, raw_cov: torch.Tensor | None = None) -> torch.Tensor:
    """The `keep` groups to keep (sorted group indices). lam / raw_cov: the ridge and undamped C of leverage."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
    n_groups = cov.shape[0] if groups is None else groups.shape[0]
    if not 0 < keep <= n_groups:
        raise ValueError(f"keep must be in 1..{n_groups}, got {keep}")
    if selection == "greedy":
        removed = greedy_removal(weight, cov, n_groups - keep, groups, target, row_weight)[0]
    else:
        removed = leverage_removal(raw_cov if raw_cov is not None else cov, n_groups - keep, lam, groups)
    mask = torch.ones(n_groups, dtype=torch.bool, device=removed.device)
    mask[removed] = False
    return torch.nonzero(mask).flatten()
