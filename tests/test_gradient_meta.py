"""Meta-gradients of MAML, ANIL, Meta-SGD and Reptile proven in float64, for every execution
path that ships (per-task loop, CPU threads, vmap over tasks), with BatchNorm in the backbone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_classes
from metafit import TaskError, TrainingError
from metafit.algorithms import algorithm_config, build_algorithm
from metafit.data import EpisodeSampler
from metafit.nn import Conv4, Conv4Config
from metafit.nn.layers import StableBatchNorm2d

PATHS = ["loop", "threads", "vmap"]


def _model(name, execution="loop", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    backbone = Conv4(Conv4Config(hidden_channels=3, n_blocks=2), in_channels=1, image_size=8)
    cfg = algorithm_config({"name": name, "execution": execution, "threads": 2, **kw})
    return build_algorithm(cfg, backbone, n_outputs=3).to(dtype)


def _batch(dtype=torch.float64, b=3, seed=0):
    data = synthetic_classes(n_classes=9, per_class=6, size=8, seed=seed)
    batch = EpisodeSampler(data, 3, 2, 2, seed=seed).sample(b)
    # continuous inputs: no ties in max-pooling, so the loss is differentiable where we probe it
    g = torch.Generator().manual_seed(seed + 1)
    noise = lambda x: (x + 0.3 * torch.randn(x.shape, generator=g)).to(dtype)  # noqa: E731
    return type(batch)(noise(batch.support_x), batch.support_y, noise(batch.query_x), batch.query_y, batch.n_ways)


def _meta_grad(model, batch):
    model.zero_grad(set_to_none=True)
    out = model.meta_loss(batch)
    out.loss.backward()
    return float(out.loss.detach()), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                             for p in model.parameters()]


def _directional_fd(model, batch, direction, h=1e-5):
    params = list(model.parameters())

    def shifted(scale):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(scale * h * d)
        value = float(model.meta_loss(batch).loss.detach())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(scale * h * d)
        return value

    return (shifted(1.0) - shifted(-1.0)) / (2 * h)


def _assert_meta_gradient_matches_fd(model, batch, seed, directions=3, tol=1e-7, h=1e-5):
    """Analytic meta-gradient against central differences of step ``h`` along random directions
    (float64), to ``tol`` relative to the larger of 1 and the difference quotient."""
    _, grads = _meta_grad(model, batch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
        analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
        numeric = _directional_fd(model, batch, direction, h)
        assert abs(analytic - numeric) <= tol * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("execution", PATHS)
@pytest.mark.parametrize("name,extra", [
    ("maml", {"inner_steps": 2, "inner_lr": 0.3}),
    ("anil", {"inner_steps": 3, "inner_lr": 0.5}),
    ("metasgd", {"inner_steps": 1, "inner_lr": 0.3}),
])
def test_second_order_meta_gradient_matches_finite_differences(name, extra, execution):
    _assert_meta_gradient_matches_fd(_model(name, execution, **extra), _batch(), seed=3)


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "reptile"])
def test_threads_and_loop_give_the_same_meta_gradient(name):
    batch = _batch(b=5)
    loop_loss, loop = _meta_grad(_model(name, "loop", first_order=False) if name != "reptile"
                                 else _model(name, "loop"), batch)
    thr_loss, thr = _meta_grad(_model(name, "threads") if name == "reptile"
                               else _model(name, "threads", first_order=False), batch)
    assert abs(loop_loss - thr_loss) < 1e-12
    for a, b in zip(loop, thr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_maml_with_zero_inner_steps_is_the_plain_query_loss():
    model = _model("maml", inner_steps=0)
    batch = _batch(b=2)
    loss, grads = _meta_grad(model, batch)
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    ref = sum(F.cross_entropy(plain(batch.query_x[i]), batch.query_y[i]) for i in range(2)) / 2
    ref.backward()
    assert abs(loss - float(ref.detach())) < 1e-12
    for g, p in zip(grads, plain.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("execution", PATHS)
def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights(execution):
    lr, steps = 0.3, 2
    model = _model("maml", execution, first_order=True, inner_steps=steps, inner_lr=lr)
    batch = _batch(b=2)
    _, grads = _meta_grad(model, batch)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(2):
        fast = copy.deepcopy(model)
        for _ in range(steps):  # plain SGD on a copy, by hand
            fast.zero_grad(set_to_none=True)
            F.cross_entropy(fast(batch.support_x[i]), batch.support_y[i]).backward()
            with torch.no_grad():
                for p in fast.parameters():
                    p.sub_(lr * p.grad)
        fast.zero_grad(set_to_none=True)
        (F.cross_entropy(fast(batch.query_x[i]), batch.query_y[i]) / 2).backward()
        for e, p in zip(expected, fast.parameters()):
            e += p.grad
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_one_task_one_step_reptile_is_the_interpolation():
    lr, eps = 0.2, 0.5
    model = _model("reptile", inner_steps=1, inner_lr=lr)
    batch = _batch(b=1)
    before = copy.deepcopy(model)
    x = torch.cat([batch.support_x[0], batch.query_x[0]])
    y = torch.cat([batch.support_y[0], batch.query_y[0]])
    F.cross_entropy(before(x), y).backward()
    adapted = [p - lr * p.grad for p in before.parameters()]
    expected = [p + eps * (a - p) for p, a in zip(before.parameters(), adapted)]
    opt = torch.optim.SGD(model.parameters(), lr=eps, momentum=0.0)
    opt.zero_grad()
    model.meta_loss(batch).loss.backward()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-10, atol=1e-12)


def test_reptile_with_the_papers_inner_adam_equals_torch_adam_on_stratified_minibatches():
    lr, steps, size = 0.01, 4, 3
    model = _model("reptile", inner_steps=steps, inner_lr=lr, inner_optimizer="adam", inner_batch_size=size,
                   adam_beta1=0.0)
    assert model.executor.resolve(torch.device("cuda"))[0] != "vmap"  # per-task optimiser state
    batch = _batch(b=1)
    x = torch.cat([batch.support_x[0], batch.query_x[0]])
    y = torch.cat([batch.support_y[0], batch.query_y[0]])
    copy_ = copy.deepcopy(model)
    opt = torch.optim.Adam(copy_.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    order = [i for j in range(4) for c in range(3) for i in [int(torch.nonzero(y == c)[j])]]
    for step in range(steps):
        idx = [order[(step * size + k) % len(order)] for k in range(size)]
        assert sorted(int(y[i]) for i in idx) == [0, 1, 2]  # one example of every class
        opt.zero_grad()
        F.cross_entropy(copy_(x[idx]), y[idx]).backward()
        opt.step()
    _, grads = _meta_grad(model, batch)
    for g, p, q in zip(grads, model.parameters(), copy_.parameters()):
        # atol: the conv biases before BatchNorm have zero gradient up to rounding (1e-17), which
        # Adam divides by eps = 1e-8 -- steps of 1e-10 that follow the rounding
        torch.testing.assert_close(g, (p - q).detach(), rtol=1e-9, atol=1e-9)
    # the moments carry over to the next meta-batch (as in supervised-reptile): here Adam's own
    st = model.inner_adam
    assert int(st.t) == steps
    for (n, p), q in zip(model.named_parameters(), copy_.parameters()):
        torch.testing.assert_close(getattr(st, "v__" + n.replace(".", "__")), opt.state[q]["exp_avg_sq"],
                                   rtol=1e-9, atol=1e-15)
    # adaptation starts from them and leaves them alone
    before = {k: t.clone() for k, t in st.state_dict().items()}
    model.adapt(x, y, 3, steps=2)
    assert all(torch.equal(before[k], t) for k, t in st.state_dict().items())
    assert "inner_adam.t" in model.state_dict()  # saved in checkpoints


def test_reptile_adam_moments_are_the_mean_over_tasks_and_independent_of_threads():
    kw = dict(inner_steps=2, inner_lr=0.01, inner_optimizer="adam", inner_batch_size=3)
    batch = _batch(b=4)
    loop, thr = _model("reptile", "loop", **kw), _model("reptile", "threads", **kw)
    for _ in range(2):
        _, gl = _meta_grad(loop, batch)
        _, gt = _meta_grad(thr, batch)
    for a, b in zip(gl, gt):  # atol: Adam amplifies the rounding-level gradients of pre-BatchNorm biases
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for (k, a), (_, b) in zip(loop.inner_adam.state_dict().items(), thr.inner_adam.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    # one task at a time from the same start: the mean of their moments
    single = []
    for i in range(4):
        m = _model("reptile", "loop", **kw)
        m.meta_loss(type(batch)(batch.support_x[i:i + 1], batch.support_y[i:i + 1], batch.query_x[i:i + 1],
                                batch.query_y[i:i + 1], batch.n_ways))
        single.append(m.inner_adam.state_dict())
    fresh = _model("reptile", "loop", **kw)
    fresh.meta_loss(batch)
    for k, t in fresh.inner_adam.state_dict().items():
        if k != "t":
            torch.testing.assert_close(t, torch.stack([s_[k] for s_ in single]).mean(0), rtol=1e-10, atol=1e-15)


def test_reptile_stratified_minibatches():
    from metafit.algorithms.reptile import minibatch, stratified_order
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    order = stratified_order(y, "classification")
    assert order.tolist() == [0, 2, 4, 1, 3, 5, 6]
    assert minibatch(order, 0, 3).tolist() == [0, 2, 4]
    assert minibatch(order, 2, 3).tolist() == [6, 0, 2]  # cycles
    assert minibatch(order, 5, None) is None and minibatch(order, 0, 7) is None
    from metafit import ConfigError
    with pytest.raises(ConfigError, match="execution 'vmap' must be used with Reptile's full-batch SGD"):
        _model("reptile", "vmap", inner_optimizer="adam")


def test_metasgd_step_sizes_learn_in_first_order_mode():
    model = _model("metasgd", first_order=True)
    _meta_grad(model, _batch())
    # every step size learns, except those of conv biases right before BatchNorm: the normalisation
    # cancels them, so their gradient is zero (exactly so in the first block, where BatchNorm is
    # folded into the convolution; rounding-level in the second)
    for name, p in model.step_sizes.named_parameters():
        assert p.grad is not None
        assert float(p.grad.abs().sum()) > (0 if "__0__bias" not in name else -1), name
    assert float(model.step_sizes.backbone__blocks__0__0__bias.grad.abs().sum()) < 1e-15


def test_per_step_batchnorm_keeps_statistics_per_inner_step():
    model = _model("maml", bn_mode="per_step", inner_steps=2, execution="threads")
    assert model.executor.resolve(torch.device("cpu"))[0] == "loop"  # in-place statistics: no threads
    batch = _batch()
    model.train()
    model.meta_loss(batch)
    stats = [model.stats.at(k) for k in range(3)]
    means = [s["backbone.blocks.0.1.running_mean"] for s in stats]
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[1], means[2])
    assert all(int(s["backbone.blocks.0.1.num_batches_tracked"]) == 3 for s in stats)
    # at evaluation a prediction no longer depends on the other examples of the batch
    model.eval()
    task = batch[0]
    adapted = model.adapt(task.support_x, task.support_y, 3)
    full = model.predict(adapted, task.query_x)
    one = model.predict(adapted, task.query_x[:1])
    torch.testing.assert_close(full[:1], one)


def test_head_size_mismatch_names_the_fix():
    model = _model("maml")
    with pytest.raises(TaskError, match="n_ways must equal the 3 outputs.*task.n_ways=4"):
        model.adapt(torch.zeros(4, 1, 8, 8, dtype=torch.float64), torch.arange(4), 4)


def test_out_of_memory_suggests_first_order(monkeypatch):
    model = _model("maml")

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model.executor, "run", boom)
    with pytest.raises(TrainingError, match="first_order=true"):
        model.meta_loss(_batch())


@pytest.mark.parametrize("name", ["maml", "anil", "reptile"])
def test_out_of_memory_under_vmap_suggests_the_loop(monkeypatch, name):
    import metafit.algorithms.common as common
    import metafit.algorithms.anil as anil
    import metafit.algorithms.reptile as reptile

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for module in (common, anil, reptile):
        monkeypatch.setattr(module, "batched_inner_loop", boom)
    with pytest.raises(TrainingError, match="execution=loop"):
        _model(name, "vmap", **({} if name == "reptile" else {"first_order": True})).meta_loss(_batch())


def test_stable_batchnorm_matches_batchnorm_and_is_accurate_in_channels_last():
    torch.manual_seed(0)
    ref, ours = torch.nn.BatchNorm2d(6).double(), StableBatchNorm2d(6)
    ours.load_state_dict(ref.state_dict())
    x = torch.rand(10, 6, 9, 9, dtype=torch.float64) * 0.1 + 5.0  # large mean, small spread
    xf = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    xd = x.clone().requires_grad_()
    y_ref, y = ref(xd), ours(xf)
    assert float((y.detach().double() - y_ref.detach()).abs().max()) < 1e-4
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    (y * w.float()).sum().backward()
    rel = float((xf.grad.double() - xd.grad).norm() / xd.grad.norm())
    assert rel < 1e-4
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-4, atol=1e-6)
    assert int(ours.num_batches_tracked) == 1


# ---- the vectorised path (vmap over tasks): backbones without BatchNorm only -----------------
def _mlp_model(name, execution, seed=0, **kw):
    from metafit.nn import MLP, MLPConfig
    torch.manual_seed(seed)
    backbone = MLP(MLPConfig(hidden=[6, 5], activation="tanh"), in_channels=1, image_size=1)
    cfg = algorithm_config({"name": name, "execution": execution, "threads": 2, **kw})
    return build_algorithm(cfg, backbone, n_outputs=1, task_kind="regression").double()


def _sinusoid_batch(b=4, k=5, q=6, seed=0):
    from metafit.data import SinusoidFamily
    batch = SinusoidFamily().sampler(k, q, seed).sample(b)
    return type(batch)(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)), 1)


@pytest.mark.parametrize("name,extra", [
    ("maml", {"inner_steps": 2, "inner_lr": 0.05}),
    ("anil", {"inner_steps": 3, "inner_lr": 0.1}),
    ("metasgd", {"inner_steps": 1, "inner_lr": 0.05}),
])
def test_vmap_second_order_meta_gradient_matches_finite_differences(name, extra):
    model = _mlp_model(name, "vmap", **extra)
    assert model.executor.resolve(torch.device("cpu"))[0] == "vmap"
    _assert_meta_gradient_matches_fd(model, _sinusoid_batch(), seed=5)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "reptile"])
def test_vmap_equals_the_per_task_loop(name, first_order):
    kw = {} if name == "reptile" else {"first_order": first_order}
    batch = _sinusoid_batch()
    loss_v, grad_v = _meta_grad(_mlp_model(name, "vmap", **kw), batch)
    loss_l, grad_l = _meta_grad(_mlp_model(name, "loop", **kw), batch)
    assert abs(loss_v - loss_l) < 1e-10
    for a, b in zip(grad_v, grad_l):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "reptile"])
def test_vmap_with_batchnorm_equals_the_per_task_loop(name, first_order):
    """vmap over tasks with transductive BatchNorm: every task normalised with its own images."""
    kw = {} if name == "reptile" else {"first_order": first_order, "inner_steps": 2}
    batch = _batch(b=4)
    vm = _model(name, "vmap", **kw)
    assert vm.executor.resolve(torch.device("cpu"))[0] == "vmap"
    loss_v, grad_v = _meta_grad(vm, batch)
    loss_l, grad_l = _meta_grad(_model(name, "loop", **kw), batch)
    assert abs(loss_v - loss_l) < 1e-12
    for a, b in zip(grad_v, grad_l):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auto_execution_picks_the_strategy_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert _mlp_model("maml", "auto").executor.resolve(cpu)[0] == "vmap"
    assert _model("maml", "auto").executor.resolve(cpu)[0] in ("threads", "loop")  # BatchNorm on a CPU
    assert _model("maml", "auto").executor.resolve(gpu)[0] == "vmap"  # resolve() allocates nothing
    assert _model("maml", "auto", bn_mode="per_step").executor.resolve(gpu)[0] == "loop"
    from metafit import ConfigError
    with pytest.raises(ConfigError, match="execution 'vmap' must be used with bn_mode 'transductive'"):
        _model("maml", "vmap", bn_mode="per_step")


# ---- training-level guarantees for the gradient-based learners ---------------------------------
@pytest.mark.parametrize("name,execution,extra", [
    ("maml", "threads", {"inner_steps": 1}),
    ("reptile", "threads", {"inner_steps": 2}),
    ("maml", "loop", {"bn_mode": "per_step", "inner_steps": 2}),
])
def test_resume_is_bit_for_bit(tmp_path, synthetic_splits, name, execution, extra):
    from conftest import tiny_config
    from metafit.training import Trainer, make_config

    def cfg(run, steps):
        return make_config(tiny_config(
            tmp_path / run, algorithm={"name": name, "execution": execution, "threads": 2, **extra},
            backbone={"bn_mode": "running"},
            train={"meta_steps": steps, "meta_batch_size": 3, "eval_every": 2, "save_interval": 2, "log_every": 1}))

    straight = Trainer(cfg("straight", 4), splits=synthetic_splits)
    straight.fit()
    Trainer(cfg("halves", 2), splits=synthetic_splits).fit()
    resumed = Trainer(cfg("halves", 4), splits=synthetic_splits)
    resumed.fit(resume=True)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert straight.best_val == resumed.best_val


def test_per_step_statistics_round_trip_through_a_checkpoint(tmp_path):
    from conftest import tiny_config
    from metafit.training import build_model, load, make_config, save_checkpoint

    cfg = make_config(tiny_config(tmp_path, algorithm={"name": "maml", "bn_mode": "per_step", "inner_steps": 2}))
    model = build_model(cfg)
    with torch.no_grad():
        for name, buf in model.stats.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg, step=1)
    loaded = load(path)
    for (k, a), (_, b) in zip(model.stats.named_buffers(), loaded.stats.named_buffers()):
        assert torch.equal(a, b), k
    assert any(k.startswith("stats.") for k in loaded.state_dict())


class _UserBackbone(torch.nn.Module):
    """A backbone written without metafit: conv, BatchNorm, tanh, global pooling."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.out_features = 4

    def forward(self, x):
        return torch.tanh(self.bn(self.conv(x))).mean((2, 3))


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd"])
def test_any_backbone_module_works_and_its_meta_gradient_is_exact(name):
    torch.manual_seed(0)
    model = build_algorithm(algorithm_config({"name": name, "inner_lr": 0.3, "execution": "loop"}),
                            _UserBackbone(), n_outputs=3).double()
    _assert_meta_gradient_matches_fd(model, _batch(), seed=1, directions=1)


def test_a_backbone_without_out_features_is_refused_with_the_fix():
    from metafit import ConfigError
    with pytest.raises(ConfigError, match="must have an integer out_features attribute.*Set self.out_features"):
        build_algorithm(algorithm_config({"name": "maml"}), torch.nn.Flatten(), n_outputs=3)
