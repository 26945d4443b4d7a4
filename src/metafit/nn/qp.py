"""The batched quadratic-programming machinery behind :func:`metafit.nn.solvers.svm_crammer_singer`:
projection onto the scaled simplex, scaled-form ADMM, the exact active-set (KKT) polish and its
implicit gradient, and the KKT check. Every function works on a leading episode dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["ActiveSetSolve", "admm", "kkt_violation", "polish", "simplex_projection"]


def simplex_projection(v: torch.Tensor, radius: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` [..., K] onto ``{z >= 0, sum z = radius}``.

    Sort-based and exact (Held, Wolfe & Crowder 1974; Duchi et al. 2008): the output is exactly
    sparse, which is what identifies the active set of the SVM dual."""
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - radius
    ind = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / ind) > 0  # true on a prefix
    rho = cond.sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)



def admm(q, p, c, z, u, rho, iters, tol, check_every, alpha=1.6):
    """Scaled-form ADMM for min 1/2 tr(b^T Q b) + <P, b> s.t. each row of b in the C-simplex,
    split as b = z (b: quadratic part, z: simplex part). Runs ``iters`` iterations at most,
    checking the residuals every ``check_every``; returns z, u, rho, iterations and residuals."""
    n = p.shape[-2]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    # explicit inverse of Q + rho I (condition number <= sqrt(cond Q) at the chosen rho): a batched
    # matmul per iteration is faster than two triangular solves
    inv = torch.cholesky_inverse(torch.linalg.cholesky(q + rho * eye))
    pscale = 1.0 + p.abs().amax((-2, -1))
    # keep rho within 1e+-6 of Q's mean eigenvalue: Q + rho I stays positive definite in float64
    # even when Q is singular (ridge = 0)
    qscale = q.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12).view(-1, 1, 1)
    done = 0
    r_prim = r_dual = torch.full(p.shape[:1], float("inf"), dtype=q.dtype, device=q.device)
    while done < iters:
        steps = min(check_every, iters - done)
        for _ in range(steps):
            z_prev = z
            x = inv @ (rho * (z - u) - p)
            xh = alpha * x + (1.0 - alpha) * z_prev  # over-relaxation (Boyd et al. 2011, sec. 3.4.3)
            z = simplex_projection(xh + u, c)
            u = u + xh - z
        done += steps
        r_prim = (x - z).abs().amax((-2, -1)) / c
        r_dual = (rho * (z - z_prev)).abs().amax((-2, -1)) / (pscale + (q @ z + p).abs().amax((-2, -1)))
        if bool(((r_prim <= tol) & (r_dual <= tol)).all()):
            break
        # residual balancing (Boyd et al. 2011, sec. 3.4.1), per episode, with a refactorisation
        ratio = (r_prim / r_dual.clamp_min(1e-300)).view(-1, 1, 1)
        scale = torch.where(ratio > 10.0, 2.0, torch.where(ratio < 0.1, 0.5, 1.0)).to(q.dtype)
        new_rho = (rho * scale).clamp(1e-6 * qscale, 1e6 * qscale)
        if bool((new_rho != rho).any()):
            u = u * (rho / new_rho)
            rho = new_rho
            inv = torch.cholesky_inverse(torch.linalg.cholesky(q + rho * eye))
    return z, u, rho, done, r_prim, r_dual


def polish(q, p, c, mask, keep=False):
    """Solve the equality-constrained QP on the free set ``mask`` exactly.

    Free variables satisfy ``(Q beta)_ik + P_ik = nu_i`` and every row sums to ``C``. The Hessian
    restricted to the free set is block-diagonal over classes (block k = Q on the examples free in
    class k), so each block is factored on its own (padded to the largest block, padding decoupled
    as identity rows) and the row constraints are eliminated through the n x n Schur complement
    ``S = sum_k E_k H_k^-1 E_k^T``. Returns beta [B, n, K], nu [B, n] and a per-episode flag that
    both factorisations succeeded (they fail when Q is singular on the free set, e.g. ridge = 0
    with fewer feature dimensions than examples); with ``keep`` also the factors, for the adjoint
    solve of :class:`ActiveSetSolve`."""
    bsz, n, k = p.shape
    m = mask.transpose(1, 2)  # [B, K, n]
    counts = m.sum(-1)
    msz = max(int(counts.max()), 1)
    idx = torch.sort((~m).to(torch.uint8), dim=-1, stable=True).indices[..., :msz]  # free examples first
    valid = torch.arange(msz, device=q.device) < counts[..., None]  # [B, K, M]
    vf = valid.to(q.dtype)
    # padding slots scatter into a dummy row/column n (dropped): no masking of the big blocks needed
    tgt = torch.where(valid, idx, n)
    bi = torch.arange(bsz, device=q.device)[:, None, None, None]
    h = q[bi, idx[..., :, None], idx[..., None, :]]  # [B, K, M, M]
    h = h * (vf[..., :, None] * vf[..., None, :])
    h.diagonal(dim1=-2, dim2=-1).add_(1.0 - vf)  # identity on the padding
    chol, info = torch.linalg.cholesky_ex(h)
    ok = (info == 0).all(-1)
    if not bool(ok.all()):
        eye = torch.eye(msz, dtype=q.dtype, device=q.device)
        chol = torch.where((info == 0)[..., None, None], chol, eye)
    hinv = torch.cholesky_inverse(chol)  # [B, K, M, M]
    pk = p.transpose(1, 2).gather(-1, idx) * vf  # [B, K, M]
    # Schur complement S [B, n, n] and right-hand side: S nu = C 1 + sum_k E_k H_k^-1 p_k
    lin = (tgt[..., :, None] * (n + 1) + tgt[..., None, :]).reshape(bsz, -1)
    s = q.new_zeros(bsz, (n + 1) ** 2).scatter_add(1, lin, hinv.reshape(bsz, -1))
    s = s.view(bsz, n + 1, n + 1)[:, :n, :n]
    hp = (hinv @ pk[..., None])[..., 0]  # [B, K, M]
    rhs = q.new_full((bsz, n + 1), float(c)).scatter_add(1, tgt.reshape(bsz, -1), hp.reshape(bsz, -1))[:, :n]
    schol, sinfo = torch.linalg.cholesky_ex(s)
    ok = ok & (sinfo == 0)
    if not bool(ok.all()):
        schol = torch.where(ok[:, None, None], schol, torch.eye(n, dtype=q.dtype, device=q.device))
    nu = torch.cholesky_solve(rhs[..., None], schol)[..., 0]  # [B, n]
    nuk = nu.gather(1, idx.reshape(bsz, -1)).view(bsz, k, msz)
    beta_k = (hinv @ (nuk - pk)[..., None])[..., 0]  # padding slots hold junk; they go to the dummy
    flat = torch.where(valid, idx * k + torch.arange(k, device=q.device)[None, :, None], n * k)
    beta = q.new_zeros(bsz, n * k + 1).scatter(1, flat.reshape(bsz, -1), beta_k.reshape(bsz, -1))
    beta = beta[:, : n * k].view(bsz, n, k)
    if keep:
        return beta, nu, ok, (idx, valid, tgt, flat, hinv, schol)
    return beta, nu, ok


class ActiveSetSolve(torch.autograd.Function):
    """beta(Q, P) on a fixed free set, differentiated implicitly (adjoint method).

    The solution satisfies ``H beta_A - E^T nu = -P_A`` and ``E beta_A = C`` (H: Q on the free
    set, E: the row-sum constraints). For an upstream gradient g on beta_A the adjoint system
    ``H lam + E^T eta = g, E lam = 0`` is solved with the forward's factors (block inverses and the
    Schur complement's Cholesky: O(K M^2 + n^2) instead of back-propagating through the O(K M^3)
    factorisations), and then dL/dP = -lam, dL/dQ = -lam beta^T (lam zero off the free set)."""

    @staticmethod
    def forward(ctx, q, p, mask, c):
        beta, nu, ok, (idx, valid, tgt, flat, hinv, schol) = polish(q, p, c, mask, keep=True)
        ctx.save_for_backward(beta, idx, valid, tgt, flat, hinv, schol)
        ctx.mark_non_differentiable(nu, ok)
        return beta, nu, ok

    @staticmethod
    @once_differentiable
    def backward(ctx, gbeta, _gnu, _gok):
        beta, idx, valid, tgt, flat, hinv, schol = ctx.saved_tensors
        if gbeta is None:
            return None, None, None, None
        bsz, n, k = beta.shape
        msz = idx.shape[-1]
        gk = gbeta.transpose(1, 2).gather(-1, idx) * valid.to(gbeta.dtype)  # [B, K, M]
        hg = (hinv @ gk[..., None])[..., 0]
        rhs = gbeta.new_zeros(bsz, n + 1).scatter_add(1, tgt.reshape(bsz, -1), hg.reshape(bsz, -1))[:, :n]
        eta = torch.cholesky_solve(rhs[..., None], schol)[..., 0]  # S eta = E H^-1 g
        etak = eta.gather(1, idx.reshape(bsz, -1)).view(bsz, k, msz)
        lam_k = (hinv @ (gk - etak)[..., None])[..., 0]
        lam = gbeta.new_zeros(bsz, n * k + 1).scatter(1, flat.reshape(bsz, -1), lam_k.reshape(bsz, -1))
        lam = lam[:, : n * k].view(bsz, n, k)
        return -(lam @ beta.transpose(1, 2)), -lam, None, None


def kkt_violation(q, p, c, beta, nu, mask):
    """Relative KKT violation per episode and the primal-dual active-set update of the mask.

    ``nu`` None: the row multipliers are estimated as the mean gradient over each row's free set
    (for a point that did not come from the active-set solve)."""
    grad = q @ beta + p
    if nu is None:
        m = mask.to(grad.dtype)
        nu = (grad * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        free = torch.where(mask, (grad - nu[..., None]).abs(), torch.zeros_like(grad)).amax((-2, -1))
    else:
        free = torch.zeros(grad.shape[0], dtype=grad.dtype, device=grad.device)
    mu = grad - nu[..., None]  # multipliers of beta >= 0 (zero on the free set)
    scale = 1.0 + p.abs().amax((-2, -1))
    primal = torch.where(mask, -beta, torch.zeros_like(beta)).amax((-2, -1)).clamp_min(0) / c
    dual = torch.where(mask, torch.zeros_like(mu), -mu).amax((-2, -1)).clamp_min(0) / scale
    rows = (beta.sum(-1) - c).abs().amax(-1) / c  # holds by construction; checked for safety
    violation = torch.maximum(torch.maximum(primal, dual), torch.maximum(rows, free / scale))
    # primal-dual active-set step (Hintermueller, Ito & Kunisch 2002): free next if beta > 0 on the
    # free set or mu < 0 on the bound set; a row keeps at least its most attractive variable
    new = (mask & (beta > 0)) | (~mask & (mu < 0))
    score = torch.where(mask, beta, -mu)
    top = F.one_hot(score.argmax(-1), p.shape[-1]).bool()
    new = torch.where(new.any(-1, keepdim=True), new, top)
    return violation, new

