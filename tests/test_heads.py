"""Differentiable-solver heads: ridge regression (R2D2) and the Crammer-Singer SVM (MetaOptNet),
against closed forms, scikit-learn, the KKT conditions, gradcheck and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_classes
from metafit import ConfigError, TaskError
from metafit.algorithms import MetaOptNetSVM, R2D2, algorithm_config, build_algorithm
from metafit.data import EpisodeSampler
from metafit.nn import Conv4, Conv4Config
from metafit.nn.solvers import ridge_weights, simplex_projection, svm_crammer_singer

DT = torch.float64


def _labels(b, n_ways, k_shots):
    return torch.arange(n_ways).repeat(k_shots).expand(b, -1).contiguous()


# ---- ridge regression ------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_ridge_matches_the_primal_closed_form_and_is_batched(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, dtype=DT, generator=g)
    y = F.one_hot(_labels(3, 4, 2), 4).to(DT)
    lam = torch.tensor([0.5, 2.0, 7.0], dtype=DT)
    w = ridge_weights(x, y, lam, bias_feature=bias)
    assert w.shape == (3, 5 + bias, 4)
    xb = torch.cat([x, torch.ones(3, 8, 1, dtype=DT)], -1) if bias else x
    for i in range(3):  # primal: (X^T X + lam I)^-1 X^T Y, a d x d solve
        eye = torch.eye(xb.shape[-1], dtype=DT)
        primal = torch.linalg.solve(xb[i].T @ xb[i] + lam[i] * eye, xb[i].T @ y[i])
        torch.testing.assert_close(w[i], primal, rtol=1e-10, atol=1e-12)
        one = ridge_weights(x[i:i + 1], y[i:i + 1], float(lam[i]), bias_feature=bias)[0]
        torch.testing.assert_close(one, w[i], rtol=1e-12, atol=1e-14)


def test_ridge_gradcheck_features_and_lambda():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, dtype=DT, generator=g, requires_grad=True)
    y = F.one_hot(_labels(2, 3, 2)[:, :5], 3).to(DT)
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ridge_weights(a, y, b, bias_feature=True), (x, lam))


def test_ridge_rejects_bad_inputs_with_the_fix():
    with pytest.raises(TaskError, match=r"ridge_weights: support.ndim must be 3 .*got 2\. Add a leading episode"):
        ridge_weights(torch.zeros(4, 3), torch.zeros(4, 2), 1.0)
    with pytest.raises(ConfigError, match=r"ridge_weights: lam must be > 0; got"):
        ridge_weights(torch.zeros(1, 4, 3), torch.zeros(1, 4, 2), 0.0)


# ---- the SVM ----------------------------------------------------------------------------------
def _kkt_report(x, y, n_ways, c, ridge, alpha):
    """The KKT conditions of the beta = C e_y - alpha form, computed here from scratch:
    beta >= 0, rows sum to C, gradient Q beta + P equal (nu_i) on each row's free entries and
    >= nu_i on its zero entries. Returns violations and strict-complementarity margins."""
    yy = F.one_hot(y, n_ways).to(DT)
    q = x @ x.transpose(-1, -2) + ridge * torch.eye(x.shape[-2], dtype=DT)
    p = yy - c * q @ yy
    beta = c * yy - alpha
    grad = q @ beta + p
    free = beta > 1e-10 * c
    nu = (grad * free).sum(-1) / free.sum(-1)
    mu = grad - nu[..., None]
    ay = (alpha * yy).sum(-1)
    return dict(
        primal=float((-beta).clamp_min(0).max()) / c,
        rows=float((beta.sum(-1) - c).abs().max()) / c,
        stationarity=float(mu[free].abs().max()),
        dual=float((-mu[~free]).clamp_min(0).max()) if bool((~free).any()) else 0.0,
        min_free_beta=float(beta[free].min()) / c,
        min_bound_mu=float(mu[~free].min()) if bool((~free).any()) else float("inf"),
        at_bound=int((ay > c * (1 - 1e-9)).sum()),  # alpha_{i, y_i} = C
        free_sv=int(((ay > 1e-9 * c) & (ay < c * (1 - 1e-9))).sum()),
        non_sv=int((alpha.abs().amax(-1) < 1e-12).sum()),  # alpha_i = 0
    )


def test_simplex_projection_is_exact():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 7, 6, dtype=DT, generator=g)
    z = simplex_projection(v, 0.3)
    assert bool((z >= 0).all()) and torch.allclose(z.sum(-1), torch.full((4, 7), 0.3, dtype=DT))
    # optimality: z = max(v - theta, 0) with one theta per row, i.e. v - z is constant where z > 0
    # and at least that constant where z = 0
    theta = ((v - z) * (z > 0)).sum(-1) / (z > 0).sum(-1)
    torch.testing.assert_close(torch.where(z > 0, v - z, theta[..., None]), theta[..., None].expand_as(v))
    assert bool((v[z == 0] <= theta[..., None].expand_as(v)[z == 0] + 1e-12).all())


def test_svm_matches_scikit_learn_crammer_singer():
    svm = pytest.importorskip("sklearn.svm")
    g = torch.Generator().manual_seed(3)
    n_ways, k_shots, d, c = 4, 3, 20, 0.1
    x = torch.randn(3, n_ways * k_shots, d, dtype=DT, generator=g)
    y = _labels(3, n_ways, k_shots)
    queries = torch.randn(3, 30, d, dtype=DT, generator=g)
    alpha, info = svm_crammer_singer(x, y, n_ways, C=c, ridge=0.0, return_info=True)
    assert bool(info.polished.all())
    w = x.transpose(1, 2) @ alpha
    worst = 0.0
    for i in range(3):
        ref = svm.LinearSVC(multi_class="crammer_singer", fit_intercept=False, C=c, tol=1e-12,
                            max_iter=1_000_000).fit(x[i].numpy(), y[i].numpy())
        ref_w = torch.from_numpy(ref.coef_.T.copy())
        worst = max(worst, float((w[i] - ref_w).norm() / ref_w.norm()))
        assert torch.equal((queries[i] @ w[i]).argmax(-1), torch.from_numpy(ref.predict(queries[i].numpy())))
    assert worst < 1e-4, worst
    kkt = _kkt_report(x, y, n_ways, c, 0.0, alpha)
    assert max(kkt["primal"], kkt["rows"], kkt["stationarity"], kkt["dual"]) < 1e-10, kkt


def test_svm_with_a_singular_gram_falls_back_to_admm_and_still_matches_scikit_learn():
    """ridge = 0 with fewer feature dimensions than examples: G is singular, alpha is not unique and
    the active-set system may be singular; the primal W is unique and the ADMM fallback finds it."""
    svm = pytest.importorskip("sklearn.svm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 15, 6, dtype=DT, generator=g)
    y = _labels(2, 5, 3)
    alpha, info = svm_crammer_singer(x, y, 5, C=0.1, ridge=0.0, return_info=True)
    assert float(info.kkt_violation.max()) < 1e-9 and info.iterations < 1000
    for i in range(2):
        ref = svm.LinearSVC(multi_class="crammer_singer", fit_intercept=False, C=0.1, tol=1e-12,
                            max_iter=1_000_000).fit(x[i].numpy(), y[i].numpy())
        ref_w = torch.from_numpy(ref.coef_.T.copy())
        assert float((x[i].T @ alpha[i] - ref_w).norm() / ref_w.norm()) < 1e-4


def test_svm_propagates_non_finite_features_as_nan():
    x = torch.randn(2, 6, 4)
    x[1, 2, 0] = float("nan")
    assert bool(svm_crammer_singer(x, torch.tensor([0, 1, 2, 0, 1, 2]).expand(2, -1), 3).isnan().all())


@pytest.mark.parametrize("ridge,shape", [(1.0, (4, 10, 8)), (0.5, (2, 100, 64)), (1.0, (1, 100, 64))])
def test_svm_satisfies_the_kkt_conditions_and_is_batched(ridge, shape):
    b, n, d = shape
    n_ways = 5 if n == 10 else 20
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(b, n_ways, d, dtype=DT, generator=g)
    y = _labels(b, n_ways, n // n_ways)
    x = torch.relu(centers.gather(1, y[..., None].expand(-1, -1, d)) + torch.randn(b, n, d, dtype=DT, generator=g))
    alpha, info = svm_crammer_singer(x, y, n_ways, C=0.1, ridge=ridge, return_info=True)
    assert bool(info.polished.all()) and float(info.kkt_violation.max()) < 1e-9
    kkt = _kkt_report(x, y, n_ways, 0.1, ridge, alpha)
    assert max(kkt["primal"], kkt["rows"], kkt["stationarity"], kkt["dual"]) < 1e-9, kkt
    one = svm_crammer_singer(x[-1:], y[-1:], n_ways, C=0.1, ridge=ridge)
    torch.testing.assert_close(one[0], alpha[-1], rtol=0, atol=1e-12)


def test_svm_gradcheck_at_a_strictly_complementary_point():
    g = torch.Generator().manual_seed(2)
    x = 1.5 * torch.randn(2, 6, 10, dtype=DT, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2]).expand(2, -1)
    c, ridge = 0.1, 1.0
    alpha, info = svm_crammer_singer(x, y, 3, C=c, ridge=ridge, tol=1e-8, return_info=True)
    assert bool(info.polished.all())
    kkt = _kkt_report(x, y, 3, c, ridge, alpha)
    # examples of every kind: at the bound alpha_{i,y_i} = C, free support vectors, non-support vectors
    assert kkt["at_bound"] >= 1 and kkt["free_sv"] >= 1 and kkt["non_sv"] >= 1, kkt
    # strict complementarity with a margin far above gradcheck's perturbation (1e-6)
    assert kkt["min_free_beta"] > 1e-3 and kkt["min_bound_mu"] > 1e-2, kkt
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: svm_crammer_singer(f, y, 3, C=c, ridge=ridge), (xg,))
    # float32 features: the solve runs in float64 and the gradient is the float64 one, rounded
    x32 = x.float().requires_grad_()
    svm_crammer_singer(x32, y, 3, C=c, ridge=ridge).square().sum().backward()
    xg.grad = None
    svm_crammer_singer(xg, y, 3, C=c, ridge=ridge).square().sum().backward()
    torch.testing.assert_close(x32.grad.double(), xg.grad, rtol=1e-4, atol=1e-6)


def test_svm_fallback_keeps_a_feasible_value_and_finite_gradient():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 30, dtype=DT, generator=g, requires_grad=True)
    y = _labels(2, 5, 4)
    alpha, info = svm_crammer_singer(x, y, 5, max_iter=1, polish_rounds=1, check_every=1, return_info=True)
    assert not bool(info.polished.any())
    beta = 0.1 * F.one_hot(y, 5).to(DT) - alpha.detach()
    assert bool((beta >= 0).all()) and torch.allclose(beta.sum(-1), torch.full((2, 20), 0.1, dtype=DT))
    alpha.square().sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_svm_rejects_bad_inputs_with_the_fix():
    x = torch.zeros(1, 4, 3)
    with pytest.raises(TaskError, match=r"svm_crammer_singer: labels.shape must be \(1, 4\).*got \(4,\)"):
        svm_crammer_singer(x, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(TaskError, match=r"labels must be in 0..1; got \(0, 2\)\. Relabel"):
        svm_crammer_singer(x, torch.tensor([[0, 1, 2, 0]]), 2)
    with pytest.raises(ConfigError, match=r"C must be > 0; got 0.0"):
        svm_crammer_singer(x, torch.tensor([[0, 1, 1, 0]]), 2, C=0.0)


# ---- the algorithms ---------------------------------------------------------------------------
NAMES = ["svm", "ridge"]


def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    backbone = Conv4(Conv4Config(hidden_channels=3, n_blocks=2), in_channels=1, image_size=8)
    return build_algorithm(algorithm_config({"name": name, **kw}), backbone, n_outputs=3).to(DT)


def _batch(b=2, seed=0):
    data = synthetic_classes(n_classes=9, per_class=6, size=8, seed=seed)
    batch = EpisodeSampler(data, 3, 2, 2, seed=seed).sample(b)
    g = torch.Generator().manual_seed(seed + 1)  # continuous inputs: no ties in max-pooling
    noise = lambda x: (x + 0.3 * torch.randn(x.shape, generator=g)).to(DT)  # noqa: E731
    return type(batch)(noise(batch.support_x), batch.support_y, noise(batch.query_x), batch.query_y, batch.n_ways)


@pytest.mark.parametrize("name", NAMES)
def test_meta_gradient_matches_central_differences(name):
    """The whole model in float64 (Conv4 with BatchNorm, the solver, the learned scales):
    analytic meta-gradient against central differences along random directions."""
    model, batch = _model(name), _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model.meta_loss(batch).loss.backward()
    grads = [p.grad.clone() for p in params]
    g, h = torch.Generator().manual_seed(3), 1e-6  # truncation error ~h^2: 3e-10 here (5e-8 at 1e-5)

    def loss_at(direction, scale):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(scale * h * d)
            value = float(model.meta_loss(batch).loss)
            for p, d in zip(params, direction):
                p.sub_(scale * h * d)
        return value

    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
        analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
        numeric = (loss_at(direction, 1.0) - loss_at(direction, -1.0)) / (2 * h)
        assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("name", NAMES)
def test_adapt_then_predict_equals_task_logits_and_heads_stay_float32_under_autocast(name):
    model = _model(name).float().eval()
    task = _batch(b=1)[0]
    task = type(task)(task.support_x.float(), task.support_y, task.query_x.float(), task.query_y, 3)
    adapted = model.adapt(task.support_x, task.support_y, 3)
    assert adapted.weights.shape == (12 + (name == "ridge"), 3)
    torch.testing.assert_close(model.predict(adapted, task.query_x), model.task_logits(task), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.task_logits(task)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())


def test_algorithm_classes_and_config_defaults():
    svm, ridge = algorithm_config({"name": "svm"}), algorithm_config({"name": "ridge"})
    assert (svm.C, svm.ridge, svm.label_smoothing, svm.scale_init) == (0.1, 1.0, 0.1, 1.0)
    assert ridge.lambda_init > 0 and ridge.bias_feature
    assert isinstance(_model("svm"), MetaOptNetSVM) and isinstance(_model("ridge"), R2D2)
    frozen = _model("ridge", learn_lambda=False, learn_scale=False)
    assert [n for n, p in frozen.named_parameters() if not p.requires_grad] == ["log_lambda", "log_scale"]
