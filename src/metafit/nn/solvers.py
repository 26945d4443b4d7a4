"""Differentiable solvers for few-shot classification heads, batched over a leading episode dim.

- :func:`ridge_weights`: closed-form ridge regression onto one-hot targets through the Woodbury
  identity (R2D2, Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019).
- :func:`svm_crammer_singer`: the dual of the multi-class (Crammer-Singer) linear SVM (MetaOptNet,
  Lee, Maji, Ravichandran & Soatto, CVPR 2019, "SVM-CS" head), solved by ADMM and differentiated
  implicitly through the exact active-set (KKT) system.

Both are pure functions of tensors; gradients flow to the support features (and to ``lam``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, TaskError, constraint_message
from .qp import ActiveSetSolve, admm, kkt_violation, polish, simplex_projection

__all__ = ["SVMInfo", "ridge_weights", "simplex_projection", "svm_crammer_singer"]


def _check_batched(owner: str, name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.ndim != ndim:
        raise TaskError(constraint_message(
            owner, f"{name}.ndim", f"{ndim} ({shape_doc})", t.ndim,
            "Add a leading episode dimension (x[None]) for a single episode."))
    if not t.is_floating_point():
        raise TaskError(constraint_message(
            owner, f"{name}.dtype", "a floating-point dtype", t.dtype, f"Convert {name} with .float()."))


# ---------------------------------------------------------------------------------------------
# Ridge regression (R2D2)
# ---------------------------------------------------------------------------------------------
def ridge_weights(support: torch.Tensor, onehot: torch.Tensor, lam: torch.Tensor | float,
                  bias_feature: bool = False) -> torch.Tensor:
    """Ridge-regression weights ``W = argmin ||X W - Y||^2 + lam ||W||^2`` per episode.

    ``support`` ``X`` [B, n, d], ``onehot`` ``Y`` [B, n, K], ``lam`` > 0 a scalar or one value
    per episode [B]. With ``bias_feature`` a constant 1 is appended to every feature vector (the
    bias is regularised like the other weights, as in R2D2). Returns ``W`` [B, d(+1), K].

    Uses the Woodbury identity ``W = X^T (X X^T + lam I)^-1 Y``: an n x n system (n = support
    examples, small in few-shot learning) instead of the d x d one. The Cholesky factorisation is
    differentiable with respect to ``support``, ``onehot`` and ``lam``.
    """
    owner = "ridge_weights"
    _check_batched(owner, "support", support, 3, "[episodes, n, d]")
    if onehot.ndim != 3 or onehot.shape[:2] != support.shape[:2]:
        raise TaskError(constraint_message(
            owner, "onehot.shape", f"[{support.shape[0]}, {support.shape[1]}, n_ways]", tuple(onehot.shape),
            "Pass one one-hot row per support example (F.one_hot(labels, n_ways))."))
    x = support
    if bias_feature:
        x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
    lam_t = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    # a user-given value is checked; a learned one (exp of a parameter) is positive by construction
    if not lam_t.requires_grad and bool((lam_t <= 0).any()):
        raise ConfigError(constraint_message(owner, "lam", "> 0", lam_t.tolist(), "Use a positive regulariser."))
    if lam_t.ndim == 1:
        lam_t = lam_t[:, None, None]
    n = x.shape[-2]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    gram = x @ x.transpose(-1, -2) + lam_t * eye
    y = onehot.to(x.dtype)
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):  # not positive definite in this precision: LU instead
        coef = torch.linalg.solve(gram, y)
    else:
        coef = torch.cholesky_solve(y, chol)
    return x.transpose(-1, -2) @ coef


# ---------------------------------------------------------------------------------------------
# Crammer-Singer SVM (MetaOptNet)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SVMInfo:
    """Diagnostics of :func:`svm_crammer_singer`, one entry per episode where it is a tensor.

    ``iterations``: ADMM iterations run (shared by the batch); ``polish_rounds``: active-set solves
    run (each on the episodes still failing the KKT check); ``polished``: the returned solution
    is the exact active-set (KKT) solution; ``primal_residual``/``dual_residual``: the last ADMM
    residuals (infinity norms); ``active``: number of free dual variables at the solution;
    ``kkt_violation``: the largest violation of primal/dual feasibility of the returned solution,
    relative to ``C`` and to the gradient scale."""

    iterations: int
    polish_rounds: int
    polished: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    active: torch.Tensor
    kkt_violation: torch.Tensor



def _check_svm_inputs(features: torch.Tensor, labels: torch.Tensor, n_ways: int, C: float, ridge: float,
                      gram: bool) -> None:
    """One-line errors for inputs :func:`svm_crammer_singer` cannot solve."""
    owner = "svm_crammer_singer"
    _check_batched(owner, "features", features, 3, "[episodes, n, d] or a Gram matrix [episodes, n, n]")
    bsz, n = features.shape[:2]
    if labels.shape != (bsz, n):
        raise TaskError(constraint_message(
            owner, "labels.shape", f"{(bsz, n)} (one label per support example)", tuple(labels.shape),
            "Pass labels of shape [episodes, n]."))
    if gram and features.shape[2] != n:
        raise TaskError(constraint_message(
            owner, "features.shape", "[B, n, n] with gram=True", tuple(features.shape),
            "Pass a square Gram matrix or gram=False with features."))
    if not C > 0:
        raise ConfigError(constraint_message(owner, "C", "> 0", C, "Use a positive box constraint."))
    if not ridge >= 0:
        raise ConfigError(constraint_message(owner, "ridge", ">= 0", ridge, "Use a non-negative ridge."))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_ways):
        raise TaskError(constraint_message(
            owner, "labels", f"in 0..{n_ways - 1}", (int(labels.min()), int(labels.max())),
            "Relabel classes as 0..n_ways-1."))


def _repolish(q, p, qd, pd, c, z, u, rho, new, beta, mask, viol, polished, used, r_prim, r_dual, *, max_iter, tol,
              kkt_tol, polish_rounds, check_every):
    """Steps 2+ of :func:`svm_crammer_singer` on the episodes whose first polish failed the KKT
    check: active-set steps, then more ADMM at a tighter tolerance while iterations remain; an
    episode that never passes keeps the ADMM point's value (straight-through gradient)."""
    rounds = 1
    # the rest, on the failing episodes only: active-set steps, then more ADMM if needed
    sub = torch.nonzero(~polished).flatten()
    with torch.no_grad():
        qs, ps, zs, us, rs = qd[sub], pd[sub], z[sub], u[sub], rho[sub]
        ms = new[sub]
        todo = torch.ones(len(sub), dtype=torch.bool, device=q.device)
        stage_tol, left = float(tol), polish_rounds - 1
        while True:
            for _ in range(left):
                rounds += 1
                bs, nus, oks = polish(qs, ps, c, ms)
                vs, news = kkt_violation(qs, ps, c, bs, nus, ms)
                todo = todo & ~(oks & (vs <= kkt_tol))
                if not bool(todo.any()):
                    break
                ms = torch.where(todo[:, None, None], news, ms)
            if not bool(todo.any()) or used >= max_iter or stage_tol <= 1e-12:
                break  # done, out of iterations, or at float64's limit (singular Q: no polish)
            stage_tol *= 1e-2
            zs, us, rs, it, rp, rd = admm(qs, ps, c, zs, us, rs, max_iter - used, stage_tol, check_every)
            used += it
            r_prim, r_dual = r_prim.index_put((sub,), rp), r_dual.index_put((sub,), rd)
            ms = torch.where(todo[:, None, None], zs > 0, ms)
            left = polish_rounds
        # episodes that never passed the KKT check fall back to the free set of the ADMM point
        ms = torch.where(todo[:, None, None], zs > 0, ms)
    bs, nus, oks = ActiveSetSolve.apply(q[sub], p[sub], ms, c)  # failing episodes only
    fail = todo | ~oks
    if bool(fail.any()):
        # value of the ADMM point, gradient of the active-set system at it (straight-through)
        bs = torch.where(fail[:, None, None], zs, bs.detach()) + (bs - bs.detach())
    with torch.no_grad():
        vs = kkt_violation(qs, ps, c, bs.detach(), nus.detach(), ms)[0]
        if bool(fail.any()):
            vs = torch.where(fail, kkt_violation(qs, ps, c, zs, None, zs > 0)[0], vs)
    beta = beta.index_put((sub,), bs)
    mask = mask.index_put((sub,), ms)
    viol = viol.index_put((sub,), vs)
    polished = polished.index_put((sub,), ~fail)
    return beta, mask, viol, polished, used, rounds, r_prim, r_dual


def svm_crammer_singer(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_ways: int,
    C: float = 0.1,
    ridge: float = 1.0,
    *,
    gram: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-4,
    kkt_tol: float = 1e-9,
    polish_rounds: int = 4,
    check_every: int = 10,
    return_info: bool = False,
):
    """Dual coefficients ``alpha`` [B, n, K] of the Crammer-Singer multi-class SVM per episode.

    ``features`` are support features [B, n, d] (or, with ``gram=True``, their Gram matrices
    G [B, n, n]); ``labels`` [B, n] in ``0..n_ways-1``. Query scores are
    ``(query @ support^T) @ alpha``, i.e. primal weights ``W = support^T alpha`` [B, d, K]. The
    dual (MetaOptNet's SVM-CS head, there with ``ridge = 1``, ``C = 0.1``) is

        min_alpha 1/2 tr(alpha^T G alpha) + ridge/2 ||alpha||^2 - sum_i alpha[i, y_i]
        s.t. alpha[i, k] <= C 1[k == y_i],  sum_k alpha[i, k] = 0.

    With ``ridge = 0`` this is exactly the dual of ``min 1/2 ||W||^2 + C sum_i max_k(1[k != y_i]
    + w_k.x_i - w_{y_i}.x_i)`` (LIBLINEAR's / scikit-learn's ``crammer_singer``). ``ridge = 0`` is
    solved exactly when G is nonsingular on each class's free examples (always when there are more
    feature dimensions than support examples); otherwise see the caveat below. Substituting
    ``beta_i = C e_{y_i} - alpha_i`` makes every row a point of the scaled simplex
    ``{beta_i >= 0, sum beta_i = C}``: min 1/2 tr(beta^T Q beta) + <P, beta>, Q = G + ridge I,
    P = Y - C Q Y.

    Solver. The iterations run in float64 without gradient tracking:

    1. ADMM (Boyd et al. 2011) on the split beta = z, with over-relaxation 1.6 and per-episode
       residual balancing of rho. The beta-update solves with ``Q + rho I`` for all K right-hand
       sides at once: one n x n Cholesky per episode, inverted once (a batched matmul per
       iteration beats two triangular solves; its condition number is at most sqrt(cond Q) at the
       chosen rho), redone only when rho changes; the
       z-update is the exact sort-based projection onto the scaled simplex (batched, no loop over
       examples), so z is exactly sparse. Started at beta = C Y (alpha = 0) with rho from the
       spectrum of Q (sqrt(lmin lmax), the optimal rho of a strongly convex quadratic).
       It stops when the primal and dual residuals fall below ``tol`` (relative to C and to the
       gradient scale) or after ``max_iter`` iterations.
    2. Polishing: the free set {beta > 0} of z fixes an equality-constrained QP, solved exactly;
       its Hessian is block-diagonal over classes, so it costs K small Cholesky factorisations
       (size: examples free in that class) plus one n x n Schur complement, never the nK x nK
       system. The KKT conditions are checked (beta >= 0 on the free set, multipliers >= 0 off it,
       to ``kkt_tol``); episodes that fail take primal-dual active-set steps (Hintermueller, Ito &
       Kunisch 2002: a Newton method on the complementarity conditions, usually one or two steps
       from an ADMM point) up to ``polish_rounds`` times. Because ADMM only has to identify the
       active set, a loose ``tol`` suffices and the answer is still exact. If an episode still
       fails, ADMM resumes with a 100x tighter tolerance while iterations remain (down to 1e-12).

    Gradient. By implicit differentiation, not by unrolling: the returned beta is the solution of
    the final active-set system as a function of Q = G + ridge I and P (both built from the
    differentiable G), and its backward solves the adjoint KKT system with the forward's factors
    (:class:`ActiveSetSolve`), giving exact gradients with respect to the features wherever the
    active set is locally constant (strict complementarity; at degenerate points a one-sided
    derivative). Caveat: an episode whose polished solution never satisfies the KKT conditions
    (Q singular on the free set - ridge = 0 with fewer feature dimensions than free examples of a
    class - or ``max_iter`` too small) returns the ADMM value ``C Y - z`` with the gradient of the
    active-set system at z attached (straight-through): an approximation. ``return_info=True``
    reports ``polished`` per episode.

    Why ADMM + active set instead of a generic QP layer (OptNet/qpth, as MetaOptNet uses): qpth's
    interior point method factors the full nK x nK KKT system every iteration (2000 x 2000 for
    20-way 5-shot), whereas here every factorisation is n x n or smaller, ADMM iterations are a
    batched matmul plus a sort, and the gradient costs a few matrix-vector products.

    Returns ``alpha`` in the dtype of ``features`` (and an :class:`SVMInfo` with ``return_info``).
    """
    _check_svm_inputs(features, labels, n_ways, C, ridge, gram)
    bsz, n = features.shape[:2]
    out_dtype = features.dtype
    work = torch.float64
    g = features.to(work)
    if not gram:
        g = g @ g.transpose(-1, -2)
    eye = torch.eye(n, dtype=work, device=features.device)
    y = F.one_hot(labels, n_ways).to(work)
    c = float(C)

    if not bool(torch.isfinite(g).all()):
        # diverged features: a NaN answer lets the caller's loss report it (the Trainer names the fix)
        alpha = torch.full((bsz, n, n_ways), float("nan"), dtype=out_dtype, device=features.device)
        if not return_info:
            return alpha
        nan = torch.full((bsz,), float("nan"), dtype=work, device=features.device)
        none = torch.zeros(bsz, dtype=torch.bool, device=features.device)
        return alpha, SVMInfo(0, 0, none, nan, nan, torch.zeros(bsz, dtype=torch.long), nan)
    with torch.no_grad():
        qd = g.detach() + ridge * eye
        pd = y - c * (qd @ y)
        ev = torch.linalg.eigvalsh(qd)
        lmax = ev[:, -1].clamp_min(1e-12)
        lmin = ev[:, 0].clamp_min(1e-4 * lmax)
        rho = (lmin * lmax).sqrt().view(-1, 1, 1)
        z, u, rho, used, r_prim, r_dual = admm(qd, pd, c, c * y, torch.zeros_like(y), rho,
                                                max_iter, tol, check_every)
    # first polish on the free set of the ADMM point, built from the differentiable G
    q = g + ridge * eye
    p = y - c * (q @ y)
    mask = z > 0
    beta, nu, ok = ActiveSetSolve.apply(q, p, mask, c)
    with torch.no_grad():
        viol, new = kkt_violation(qd, pd, c, beta.detach(), nu.detach(), mask)
    polished = ok & (viol <= kkt_tol)
    rounds = 1
    if not bool(polished.all()):
        beta, mask, viol, polished, used, rounds, r_prim, r_dual = _repolish(
            q, p, qd, pd, c, z, u, rho, new, beta, mask, viol, polished, used, r_prim, r_dual,
            max_iter=max_iter, tol=tol, kkt_tol=kkt_tol, polish_rounds=polish_rounds, check_every=check_every)
    alpha = (c * y - beta).to(out_dtype)
    if not return_info:
        return alpha
    return alpha, SVMInfo(used, rounds, polished, r_prim, r_dual, mask.sum((-2, -1)), viol)
