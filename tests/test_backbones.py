"""Backbones: ResNet-12 beside Conv4, any user module as a backbone, and pretrained weights loaded
from a local file (safetensors, a weights_only PyTorch state dict, or a metafit checkpoint)."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import tiny_config, write_image_tree
from metafit import CheckpointError, ConfigError
from metafit.algorithms import algorithm_config, build_algorithm
from metafit.cli import main
from metafit.nn import BACKBONES, BackboneConfig, ResNet12, ResNet12Config, backbone_config, build_backbone
from metafit.nn.resnet12 import drop_block
from metafit.training import build_model, load, load_config, make_config, save_checkpoint
from metafit.training.pretrained import WeightsReport, load_backbone_weights
from metafit.types import TaskBatch

TINY = [4, 4, 8, 8]


def _resnet(in_channels=1, image_size=28, seed=0, **kw) -> ResNet12:
    torch.manual_seed(seed)
    return ResNet12(ResNet12Config(channels=kw.pop("channels", TINY), **kw), in_channels, image_size)


def _batch(b=2, n_ways=3, k=1, q=2, size=28, channels=1, dtype=torch.float32, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(b, n_ways * k, channels, size, size, generator=g, dtype=dtype)
    qx = torch.randn(b, n_ways * q, channels, size, size, generator=g, dtype=dtype)
    sy = torch.arange(n_ways).repeat_interleave(k).repeat(b, 1)
    qy = torch.arange(n_ways).repeat_interleave(q).repeat(b, 1)
    return TaskBatch(sx, sy, qx, qy, n_ways)


# ---- ResNet-12 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size, in_channels, pool, features", [
    (28, 1, "avg", 8), (28, 1, "flatten", 8),  # Omniglot: 28 -> 14 -> 7 -> 3 -> 1
    (84, 3, "avg", 8), (84, 3, "flatten", 8 * 5 * 5),  # miniImageNet: 84 -> 42 -> 21 -> 10 -> 5
])
def test_resnet12_output_shapes(size, in_channels, pool, features):
    net = _resnet(in_channels, size, pool=pool)
    assert net.out_features == features
    out = net(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, features) and torch.isfinite(out).all()


def test_resnet12_defaults_are_the_reference_architecture():
    cfg = ResNet12Config()
    assert cfg.channels == (64, 160, 320, 640) and cfg.pool == "avg" and cfg.drop_rate == 0.0
    net = ResNet12(cfg, 3, 84)
    assert net.out_features == 640
    assert sum(p.numel() for p in net.parameters()) == 12_424_320  # the 12.4M of MetaOptNet / RFS
    keys = net.state_dict()
    assert "layer1.0.conv1.weight" in keys and "layer4.0.downsample.1.running_var" in keys  # reference names
    assert keys["layer1.0.conv1.weight"].shape == (64, 3, 3, 3)


def test_resnet12_refuses_too_small_images():
    with pytest.raises(ConfigError, match=r"ResNet12: image_size must be at least 16 .*; got 15\. Use larger"):
        _resnet(1, 15)
    assert _resnet(1, 16).out_features == 8


def test_resnet12_is_registered_and_its_config_validated():
    assert BACKBONES["resnet12"] == (ResNet12Config, ResNet12)
    cfg = backbone_config({"name": "resnet12", "channels": TINY, "pool": "flatten"})
    assert isinstance(cfg, ResNet12Config) and isinstance(cfg, BackboneConfig) and cfg.channels == tuple(TINY)
    assert build_backbone(cfg, 1, 28).out_features == 8
    for bad, field in [({"channels": [4, 4, 8]}, "channels"), ({"channels": [4, 0, 8, 8]}, "channels.1"),
                       ({"pool": "max"}, "pool"), ({"drop_rate": 1.0}, "drop_rate"), ({"drop_rate": -0.1}, "drop_rate"),
                       ({"dropblock_size": 0}, "dropblock_size"), ({"bn_mode": "frozen"}, "bn_mode"),
                       ({"bn_momentum": 0}, "bn_momentum"), ({"weights": ""}, "weights"),
                       ({"weights_strict": "maybe"}, "weights_strict")]:
        with pytest.raises(ConfigError, match=f"backbone.{field}"):
            backbone_config({"name": "resnet12", **bad})


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("training", [True, False])
def test_resnet12_channels_last_matches_contiguous(in_channels, training):
    net = _resnet(in_channels, 28).train(training)
    for _ in range(2):  # give the running statistics something to hold
        net.train()(torch.randn(6, in_channels, 28, 28))
    net.train(training)
    x = torch.randn(6, in_channels, 28, 28)
    ref = net(x)
    net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dropblock_drops_about_drop_rate_and_is_off_at_evaluation():
    torch.manual_seed(0)
    x = torch.ones(8, 16, 10, 10)
    out = drop_block(x, 0.2, 3, training=True)
    dropped = float((out == 0).float().mean())
    assert 0.12 < dropped < 0.28, dropped
    assert torch.allclose(out.mean(), torch.tensor(1.0), atol=0.05)  # rescaled to keep the mean
    assert drop_block(x, 0.2, 3, training=False) is x
    assert drop_block(torch.ones(2, 3, 1, 1), 0.5, 5, training=True).shape == (2, 3, 1, 1)  # block clamped
    net = _resnet(1, 28, drop_rate=0.1, dropblock_size=5).train()
    assert torch.isfinite(net(torch.randn(4, 1, 28, 28))).all()
    net.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("name, extra", [
    ("protonet", {}),
    ("maml", {"first_order": True}),
    ("maml", {"first_order": False}),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_algorithms_run_on_resnet12(name, extra, channels_last):
    cfg = algorithm_config({"name": name, **extra} if name == "protonet" else
                           {"name": name, "inner_steps": 1, "execution": "loop", **extra})
    model = build_algorithm(cfg, _resnet(1, 28, drop_rate=0.1), n_outputs=3)
    batch = _batch()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = model.meta_loss(batch)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    model.eval()
    adapted = model.adapt(batch.support_x[0], batch.support_y[0], 3)
    assert model.predict(adapted, batch.query_x[0]).shape == (6, 3)


def test_maml_second_order_meta_gradient_through_resnet12_matches_finite_differences():
    """float64 central differences along one random direction: proves the in-place activations
    and the residual path are right under functional_call and double backward."""
    cfg = algorithm_config({"name": "maml", "inner_steps": 1, "inner_lr": 0.1, "execution": "loop"})
    model = build_algorithm(cfg, _resnet(1, 16, channels=[3, 3, 3, 3], seed=2), n_outputs=3).double()
    # seeds and step chosen away from the kinks of LeakyReLU/max-pool on the tiny 2x2 and 1x1 maps
    batch = _batch(b=1, k=2, size=16, dtype=torch.float64, seed=2)
    model.zero_grad()
    model.meta_loss(batch).loss.backward()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))

    def shifted(h):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(h * d)
        value = float(model.meta_loss(batch).loss.detach())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(h * d)
        return value

    numeric = (shifted(1e-6) - shifted(-1e-6)) / 2e-6
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


# ---- any user module ------------------------------------------------------------------------------
class UserNet(torch.nn.Module):
    """A backbone written without metafit: only ``out_features`` is required."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.proj = torch.nn.Linear(4 * width, 5)
        self.out_features = 5

    def forward(self, x):
        return self.proj(self.encoder(x))


def test_a_user_module_is_a_backbone_for_protonet_and_takes_weights(tmp_path):
    torch.manual_seed(0)
    model = build_algorithm(algorithm_config({"name": "protonet"}), UserNet(), n_outputs=3)
    out = model.meta_loss(_batch(size=12))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.backbone.parameters())

    source = UserNet().eval()
    path = tmp_path / "user.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = UserNet().eval()
    report = load_backbone_weights(target, path)
    assert report.prefix == "module." and report.prefix_detected and report.complete
    assert report.format == "torch state dict, weights_only, under ['state_dict']"
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


# ---- load_backbone_weights ------------------------------------------------------------------------
def _run_config(tmp_path, backbone: dict, **sections) -> dict:
    """``tiny_config`` with its backbone section replaced (not merged) and 28x28 images."""
    cfg = tiny_config(tmp_path, data={"image_size": 28}, **sections)
    cfg["backbone"] = backbone
    return cfg


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size=28) -> None:
    x = torch.randn(4, 1, size, size)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def _trained_looking(net: torch.nn.Module) -> torch.nn.Module:
    """Non-default BatchNorm statistics, so that buffers are checked too."""
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    return net


def test_safetensors_round_trip(tmp_path):
    source = _trained_looking(_resnet(seed=1))
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = _resnet(seed=2)
    report = load_backbone_weights(target, path)
    assert isinstance(report, WeightsReport)
    assert report.format == "safetensors" and report.prefix == "" and report.complete
    assert report.loaded == len(source.state_dict()) and report.ignored == 0
    _same_outputs(source, target)


def test_torch_state_dict_round_trip_with_a_given_prefix(tmp_path):
    source = _trained_looking(_resnet(seed=1))
    path = tmp_path / "w.pth"
    torch.save({"model": {f"encoder.{k}": v.half() for k, v in source.state_dict().items()}}, path)
    target = _resnet(seed=2)
    report = load_backbone_weights(target, path, prefix="encoder")  # read as 'encoder.'
    assert report.prefix == "encoder." and not report.prefix_detected and report.complete
    assert target.layer1[0].conv1.weight.dtype == torch.float32  # converted to the module's dtype
    torch.testing.assert_close(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight.half().float())


def test_metafit_checkpoint_backbone_loads_into_a_fresh_model(tmp_path):
    cfg = make_config(_run_config(tmp_path, {"name": "resnet12", "channels": TINY}))
    torch.manual_seed(1)
    trained = build_model(cfg)
    _trained_looking(trained.backbone)
    path = save_checkpoint(tmp_path / "ck.safetensors", trained, cfg, step=0)
    torch.manual_seed(2)
    fresh = build_model(cfg)
    report = load_backbone_weights(fresh.backbone, path)
    assert report.format == "safetensors, metafit checkpoint"
    assert report.prefix == "model.backbone." and report.prefix_detected and report.complete
    assert report.ignored == 1  # ProtoNet's log_scale
    _same_outputs(trained.backbone, fresh.backbone)


def test_partial_file_reports_missing_and_unexpected_keys(tmp_path):
    source = _resnet(seed=1).state_dict()
    dropped = ["layer4.0.conv3.weight", "layer4.0.bn3.weight"]
    state = {k: v for k, v in source.items() if k not in dropped}
    state["classifier.weight"] = torch.zeros(5, 8)
    state["layer1.0.num_batches_tracked_rfs"] = torch.zeros(())
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    target = _resnet(seed=2)
    before = target.layer4[0].conv3.weight.detach().clone()
    report = load_backbone_weights(target, path)
    assert report.missing == tuple(dropped)
    assert set(report.unexpected) == {"classifier.weight", "layer1.0.num_batches_tracked_rfs"}
    assert report.loaded == len(source) - 2 and not report.complete
    assert torch.equal(target.layer4[0].conv3.weight, before)  # missing: left as initialised
    assert torch.equal(target.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])
    text = str(report)
    assert "missing, left as initialised (2): layer4.0.conv3.weight, layer4.0.bn3.weight" in text
    assert "unexpected, not used (2)" in text and "classifier.weight" in text
    with pytest.raises(CheckpointError, match=r"weights_strict=true.*2 missing.*2 unexpected.*weights_strict=false"):
        load_backbone_weights(_resnet(), path, strict=True)


def test_shape_mismatch_names_the_keys_and_both_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(_resnet(channels=[4, 4, 8, 16]).state_dict(), str(path))
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(_resnet(channels=TINY), path)
    msg = str(err.value)
    assert msg.startswith("Weights: tensor shapes in ") and "must match the backbone" in msg
    # the first and last two in the backbone's order, and how many more
    assert "got 20 mismatched: layer4.0.conv1.weight: file [16, 8, 3, 3] vs backbone [8, 8, 3, 3]; " in msg
    assert "; ... 16 more ...; layer4.0.downsample.1.running_mean: file [16] vs backbone [8]" in msg
    assert "Configure the backbone the weights were trained with" in msg


def test_zero_matching_keys_raise_and_name_the_prefixes_tried(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"net.fc.weight": torch.zeros(2, 2), "net.fc.bias": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"got no match with prefix '', 'net\.', 'net\.fc\.'.*weights_prefix"):
        load_backbone_weights(_resnet(), path)
    save_file(_resnet().state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"got no match with prefix 'backbone\.' \(file keys: layer"):
        load_backbone_weights(_resnet(), path, prefix="backbone.")


class Custom:
    """Any class that is not a tensor: weights_only must refuse to rebuild it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_with_custom_objects_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": _resnet().state_dict(), "opt": Custom()}, path)
    with pytest.raises(CheckpointError, match=r"must be a PyTorch file of tensors .*weights_only=True\) accepts; got a file it refuses "
                       r"\(Unsupported global: GLOBAL test_backbones\.Custom .*re-save just the tensors"):
        load_backbone_weights(_resnet(), path)
    evil = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_backbone_weights(_resnet(), evil)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_backbone_weights(_resnet(), raw)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"layer1.0.conv1.weight": torch.zeros(1), "epoch": 3}, plain)  # allowed types, but not a state dict
    with pytest.raises(CheckpointError, match=r"must map names to tensors .*'epoch' -> int"):
        load_backbone_weights(_resnet(), plain)


def test_missing_unreadable_and_unknown_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"Weights: backbone.weights must be an existing file; got .*nope"):
        load_backbone_weights(_resnet(), tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="must be a valid safetensors file; got an unreadable"):
        load_backbone_weights(_resnet(), bad)
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"must be a \.safetensors or a \.pt/\.pth/\.bin PyTorch file"):
        load_backbone_weights(_resnet(), text)
    sniffed = tmp_path / "weights.data"  # no known suffix: recognised by its content
    save_file(_resnet(seed=1).state_dict(), str(sniffed))
    assert load_backbone_weights(_resnet(), sniffed).complete


# ---- wiring: config, build_model, checkpoints, CLI -----------------------------------------------
def _weights_config(tmp_path, weights, **backbone):
    return make_config(_run_config(tmp_path, {"name": "resnet12", "channels": TINY, "weights": str(weights), **backbone},
                                   algorithm={"name": "maml", "execution": "loop"}))


def test_build_model_loads_weights_and_a_checkpoint_no_longer_needs_the_file(tmp_path):
    source = _trained_looking(_resnet(seed=1))
    weights = tmp_path / "pretrained.safetensors"
    save_file({f"backbone.{k}": v for k, v in source.state_dict().items()}, str(weights))
    cfg = _weights_config(tmp_path, weights)
    model = build_model(cfg)
    assert model.weights_report.complete and model.weights_report.prefix == "backbone."
    # MAML's default transductive BatchNorm drops running statistics after loading: compare parameters
    for name, p in source.named_parameters():
        assert torch.equal(model.backbone.get_parameter(name), p), name
    assert build_model(cfg, pretrained=False).weights_report is None
    assert build_model(make_config(tiny_config(tmp_path))).weights_report is None

    path = save_checkpoint(tmp_path / "ck.safetensors", model, cfg, step=0)
    weights.unlink()
    loaded = load(path)
    assert loaded.run_config.backbone.weights == str(weights)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="backbone.weights must be an existing file"):
        build_model(cfg)


def test_build_model_honours_prefix_and_strict(tmp_path):
    source = _resnet(seed=1)
    weights = tmp_path / "w.safetensors"
    save_file({**source.state_dict(), "fc.weight": torch.zeros(3, 8)}, str(weights))
    assert build_model(_weights_config(tmp_path, weights, weights_prefix="")).weights_report.unexpected == ("fc.weight",)
    with pytest.raises(CheckpointError, match="weights_strict=true"):
        build_model(_weights_config(tmp_path, weights, weights_strict=True))


def test_weights_fields_round_trip_through_yaml_and_overrides(tmp_path):
    cfg = _weights_config(tmp_path, "w/pre.safetensors", weights_prefix="model.backbone.", weights_strict=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg and again.backbone.weights_prefix == "model.backbone." and again.backbone.channels == tuple(TINY)
    assert again.to_dict()["backbone"]["weights"] == "w/pre.safetensors"
    over = load_config(path, ["backbone.weights=other.pt", "backbone.weights_prefix=null", "backbone.pool=flatten"])
    assert over.backbone.weights == "other.pt" and over.backbone.weights_prefix is None
    assert make_config({}).backbone.weights is None  # conv4 has the fields too
    assert make_config({"data": {"name": "sinusoid"}, "backbone": {"name": "mlp"}}).backbone.weights_strict is False


def test_cli_train_prints_the_weights_report_once(tmp_path, capsys):
    data = write_image_tree(tmp_path / "data", n_classes=12, per_class=4, size=16, groups=2)
    source = _resnet(1, 16, seed=1)
    weights = tmp_path / "pre.safetensors"
    save_file(source.state_dict(), str(weights))
    cfg = tiny_config(tmp_path / "run", data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25})
    cfg["backbone"] = {"name": "resnet12", "channels": TINY, "weights": str(weights)}
    cfg["task"]["n_ways"] = cfg["eval"]["n_ways"] = 3
    cfg["eval"].update({"val_episodes": 2, "test_episodes": 2})
    cfg["train"].update({"meta_steps": 2, "eval_every": 2, "save_interval": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("backbone weights: ") == 1, out
    assert f"backbone weights: {weights} (safetensors)" in out
    n = len(source.state_dict())
    assert f"loaded {n} of the backbone's {n} tensors; key prefix '' (auto-detected)" in out


@pytest.mark.parametrize("shape", [(6, 8, 28, 28), (5, 4, 7, 7), (3, 3, 21, 20)])
def test_fast_max_pool_is_identical_to_torch_including_ties_nan_and_inf(shape):
    import torch.nn.functional as F

    from metafit.nn.layers import max_pool2d

    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[0] = torch.randint(0, 3, x[0].shape).float()  # many ties
    x[1, 0, 0, 0] = float("nan")
    x[1, 1, :2, :2] = float("nan")
    x[2] = -float("inf")
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ya, yb = F.max_pool2d(a, 2), max_pool2d(b, 2)
    assert torch.equal(ya.nan_to_num(), yb.nan_to_num()) and yb.is_contiguous()
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)
    with torch.no_grad():
        assert torch.equal(F.max_pool2d(x, 2).nan_to_num(), max_pool2d(x, 2).nan_to_num())


def test_fast_max_pool_first_and_second_derivatives_pass_gradcheck():
    from metafit.nn.layers import max_pool2d

    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool2d, (x,))
    assert torch.autograd.gradgradcheck(max_pool2d, (x,))


# ---- the first Conv4 block with BatchNorm folded into the convolution ----------------------------

def _conv_bn(cin, kernel, padding, affine, track, bias=True):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, 6, kernel, padding=padding, bias=bias).double()
    bn = torch.nn.BatchNorm2d(6, affine=affine, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


@pytest.mark.parametrize("cin,kernel,padding,affine,track,bias", [
    (1, 3, 1, True, False, True), (1, 3, 1, True, True, True), (3, 3, 1, True, True, False),
    (1, 5, 0, False, False, True), (2, 3, 1, True, True, True)])
def test_folded_conv_batchnorm_equals_conv_then_batchnorm_to_second_order(cin, kernel, padding, affine, track, bias):
    from metafit.nn.layers import conv_bn_fusable, conv_then_batch_norm
    import copy
    conv, bn = _conv_bn(cin, kernel, padding, affine, track, bias)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = (torch.rand(7, cin, 9, 10) > 0.6).double() + 0.3 * torch.rand(7, cin, 9, 10).double()
    assert conv_bn_fusable(x, conv, bn)
    ours, ref = conv_then_batch_norm(x, conv, bn), bn2(conv2(x))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-11)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    params = [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]
    params2 = [p for p in (conv2.weight, conv2.bias, bn2.weight, bn2.bias) if p is not None]
    probe = torch.randn_like(ref)
    g = torch.autograd.grad((ours * probe).sum(), params, create_graph=True)
    g2 = torch.autograd.grad((ref * probe).sum(), params2, create_graph=True)
    for a, b in zip(g, g2):  # conv bias: zero in both (exactly here, rounding-level there)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    h = torch.autograd.grad(sum((t ** 2).sum() for t in g), params, allow_unused=True)
    h2 = torch.autograd.grad(sum((t ** 2).sum() for t in g2), params2, allow_unused=True)
    for a, b, p in zip(h, h2, params):  # None: a gradient that depends on no parameter (zero)
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-8, atol=1e-8)
    if track:  # running statistics updated as nn.BatchNorm2d updates them
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(bn2, name), rtol=1e-12, atol=1e-14)


def test_folded_conv_batchnorm_is_as_accurate_as_batchnorm_in_float32():
    from metafit.nn.layers import conv_then_batch_norm
    conv, bn = _conv_bn(1, 3, 1, True, False)
    x = (torch.rand(80, 1, 28, 28) > 0.8).double()
    with torch.no_grad():
        truth = bn(conv(x))
        conv32, bn32 = conv.float(), bn.float()
        err_ref = float((bn32(conv32(x.float())).double() - truth).norm() / truth.norm())
        err_ours = float((conv_then_batch_norm(x.float(), conv32, bn32).double() - truth).norm() / truth.norm())
    assert err_ours < 1e-6 and err_ref < 1e-6  # measured: 2e-7 and 1.5e-7


def test_folded_conv_batchnorm_under_bf16_autocast_stays_close():
    from metafit.nn.layers import conv_then_batch_norm
    conv, bn = _conv_bn(1, 3, 1, True, False)
    conv, bn = conv.float(), bn.float()
    x = (torch.rand(16, 1, 12, 12) > 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = bn(conv(x)).float()
        ours = conv_then_batch_norm(x, conv, bn).float()
    torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.05)  # bfloat16 keeps 8 bits


def test_folding_is_used_only_where_it_is_the_same_function():
    from metafit.nn.layers import conv_bn_fusable
    conv, bn = _conv_bn(1, 3, 1, True, True)
    x = torch.rand(4, 1, 8, 8).double()
    assert conv_bn_fusable(x, conv, bn)
    assert not conv_bn_fusable(x.requires_grad_(), conv, bn)  # input gradients need the statistics' derivative
    x = x.detach()
    bn.eval()
    assert not conv_bn_fusable(x, conv, bn)  # running statistics at evaluation: plain BatchNorm
    bn.train()
    assert not conv_bn_fusable(x, torch.nn.Conv2d(1, 6, 3, stride=2).double(), bn)
    assert not conv_bn_fusable(torch.rand(4, 8, 8, 8).double(), torch.nn.Conv2d(8, 6, 3).double(), bn)  # 72 > 32
    seen = []
    torch.func.vmap(lambda t: (seen.append(conv_bn_fusable(t, conv, bn)), t.sum())[1])(x[None])
    assert seen == [False]  # inside vmap (the GPU path): plain layers


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_first_block_folding_keeps_outputs_and_gradients(monkeypatch, backbone):
    import metafit.nn.conv4 as conv4
    import metafit.nn.resnet12 as resnet12
    from metafit.nn import Conv4, Conv4Config
    cin = 1 if backbone == "conv4" else 3

    def build(mode):
        torch.manual_seed(1)
        if backbone == "conv4":
            return Conv4(Conv4Config(hidden_channels=5, n_blocks=3, bn_mode=mode), 1, 16).double()
        return ResNet12(ResNet12Config(channels=(4, 5, 4, 3), bn_mode=mode), 3, 16).double()

    for mode, channels_last in (("transductive", False), ("running", False), ("running", True)):
        model = build(mode)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = (torch.rand(6, cin, 16, 16) > 0.7).double()
        out = model(x)
        g = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
        module = conv4 if backbone == "conv4" else resnet12
        monkeypatch.setattr(module, "conv_bn_fusable", lambda *a: False)
        plain = build(mode)
        ref = plain(x)
        g2 = torch.autograd.grad(ref.square().sum(), list(plain.parameters()))
        monkeypatch.undo()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(g, g2):
            torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, rtol=1e-9, atol=1e-11)
        if mode == "transductive":  # the folded path was taken
            first = model.blocks[0] if backbone == "conv4" else model.layer1[0]
            conv, bn = (first[0], first[1]) if backbone == "conv4" else (first.conv1, first.bn1)
            assert module.conv_bn_fusable(x, conv, bn)


def test_a_checkpoint_of_another_backbone_is_named_not_listed(tmp_path):
    from metafit.training import build_model, make_config, save_checkpoint

    cfg = make_config({"backbone": {"name": "conv4", "hidden_channels": 8}, "data": {"name": "folder", "image_size": 16}})
    ckpt = save_checkpoint(tmp_path / "conv4.safetensors", build_model(cfg), cfg, step=0)
    with pytest.raises(CheckpointError, match=r"got a metafit checkpoint of a \{name: \"conv4\", .*hidden_channels: 8"):
        load_backbone_weights(_resnet(), ckpt)


# ---- Conv4 without the last pooling stage --------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv4_without_final_pool_keeps_the_map_that_the_last_pool_would_reduce(channels_last):
    from metafit.nn import Conv4, Conv4Config
    torch.manual_seed(0)
    pooled = Conv4(Conv4Config(hidden_channels=8), 1, 28).eval()
    spatial = Conv4(Conv4Config(hidden_channels=8, final_pool=False), 1, 28).eval()
    spatial.load_state_dict(pooled.state_dict())  # same parameters: the pool holds none
    assert (pooled.out_features, spatial.out_features) == (8, 8 * 3 * 3)  # 28 -> 14 -> 7 -> 3 (-> 1)
    x = torch.randn(5, 1, 28, 28)
    if channels_last:
        spatial.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    feats = spatial(x)
    assert feats.shape == (5, 72)
    torch.testing.assert_close(torch.nn.functional.max_pool2d(feats.view(5, 8, 3, 3), 2).flatten(1),
                               pooled(x.contiguous()), rtol=1e-5, atol=1e-6)


def test_conv4_image_size_error_counts_only_the_pooling_blocks():
    from metafit.nn import Conv4, Conv4Config
    assert Conv4(Conv4Config(n_blocks=4, final_pool=False), 1, 8).out_features == 64  # 8 -> 4 -> 2 -> 1, no 4th pool
    with pytest.raises(ValueError, match=r"at least 8 for 3 pooling blocks; got 7.*final_pool: false"):
        Conv4(Conv4Config(n_blocks=4, final_pool=False), 1, 7)
