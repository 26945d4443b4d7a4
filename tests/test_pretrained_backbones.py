"""Pretrained backbones from transformers (and timm/torchvision where they import): built from a
local model directory, recorded in checkpoints so loading needs no files, used by every
algorithm, with a float64 meta-gradient check through ``functional_call``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import synthetic_classes, tiny_config, write_image_tree
from metafit import ConfigError
from metafit.algorithms import ALGORITHMS, algorithm_config, build_algorithm
from metafit.data import ClassBatchSampler, EpisodeSampler, ImageClasses
from metafit.nn import HFBackbone, HFBackboneConfig, backbone_config
from metafit.training import Trainer, build_model, load, make_config, save_checkpoint
from test_gradient_meta import _assert_meta_gradient_matches_fd

transformers = pytest.importorskip("transformers")


def _save(model, path, stats=None):
    model.save_pretrained(path)
    if stats:
        (path / "preprocessor_config.json").write_text(json.dumps(stats))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32))
    resnet = transformers.ResNetModel(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic"))
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2))
    return {"vit": _save(vit, root / "vit", {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
            "resnet": _save(resnet, root / "resnet"), "dino": _save(dino, root / "dino")}


def _rgb(data: ImageClasses) -> ImageClasses:
    return ImageClasses(data.images.expand(-1, 3, -1, -1).contiguous(), data.class_start, data.class_count,
                        data.class_names, data.class_group, data.group_names)


def _config(tmp_path, model_dir, algorithm="protonet", **extra):
    alg = {"name": algorithm, **({"n_base_classes": 10} if ALGORITHMS[algorithm].training_data == "batches" else {})}
    cfg = tiny_config(tmp_path, data={"name": "folder", "channels": 3, "image_size": 16}, algorithm=alg)
    cfg["backbone"] = {"name": "hf", "model": str(model_dir), **extra}
    return make_config(cfg)


@pytest.mark.parametrize("kind,features", [("vit", 16), ("resnet", 12), ("dino", 16)])
def test_features_are_detected_and_inputs_normalised_by_the_model(hf_dirs, tmp_path, kind, features):
    model = build_model(_config(tmp_path, hf_dirs[kind]))
    bb = model.backbone
    assert isinstance(bb, HFBackbone) and bb.out_features == features
    assert bb(torch.rand(3, 3, 16, 16)).shape == (3, features)
    assert bb(torch.rand(2, 3, 24, 24)).shape == (2, features)  # other sizes: positions interpolated
    assert not hasattr(bb, "input_mean")  # no second normalisation by metafit
    expected = (0.5, 0.5, 0.5) if kind == "vit" else (0.485, 0.456, 0.406)
    assert bb.config.mean == pytest.approx(expected)
    assert all(p.grad is None for p in bb.parameters())


def test_pooled_features_of_a_transformer_and_freezing(hf_dirs, tmp_path):
    bb = build_model(_config(tmp_path, hf_dirs["vit"], pool="cls_mean", freeze=True)).backbone
    assert bb.out_features == 32 and not any(p.requires_grad for p in bb.parameters())


def test_checkpoint_rebuilds_the_architecture_without_the_directory(hf_dirs, tmp_path):
    src = shutil.copytree(hf_dirs["vit"], tmp_path / "copy")
    cfg = _config(tmp_path / "run", src)
    trainer = Trainer(cfg, splits={"train": _rgb(synthetic_classes(12, 6, 16, seed=1)),
                                   "val": _rgb(synthetic_classes(6, 6, 16, seed=2)),
                                   "test": _rgb(synthetic_classes(6, 6, 16))})
    assert trainer.config.backbone.architecture["model_type"] == "vit"
    path = save_checkpoint(tmp_path / "c.safetensors", trainer.model, trainer.config, step=0)
    shutil.rmtree(src)
    loaded = load(path)
    x = torch.rand(4, 3, 16, 16)
    trainer.model.eval()
    assert torch.allclose(loaded.backbone(x), trainer.model.backbone(x), atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_on_a_transformers_backbone(hf_dirs, tmp_path, name):
    cfg = _config(tmp_path, hf_dirs["vit"], algorithm=name)
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _rgb(synthetic_classes(n_classes=10, size=16))
    batch = (ClassBatchSampler(data, seed=1).sample(8) if model.training_data == "batches"
             else EpisodeSampler(data, 5, 1, 3, seed=1).sample(2))
    model.meta_loss(batch).loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    task = EpisodeSampler(data, 5, 2, 3, seed=2).sample_task()
    logits = model.predict(model.adapt(task.support_x, task.support_y, 5), task.query_x)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg, step=1)
    again = load(path)
    assert torch.allclose(again.task_logits(task), model.task_logits(task), atol=1e-5)


@pytest.fixture
def float64_attention(monkeypatch):
    """transformers' eager attention takes its softmax in float32 even for float64 inputs; for a
    float64 check of metafit's meta-gradient path the same function runs at the input's precision."""
    from transformers.models.vit import modeling_vit

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.size(-1) ** -0.5 if scaling is None else scaling
        weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling_vit, "eager_attention_forward", attention)


@pytest.mark.parametrize("name,extra", [("maml", {"inner_steps": 2, "inner_lr": 0.3}),
                                        ("anil", {"inner_steps": 2, "inner_lr": 0.5})])
def test_meta_gradient_through_a_transformer_matches_finite_differences(hf_dirs, float64_attention, name, extra):
    # a ViT: smooth everywhere (GELU, LayerNorm, softmax), so central differences are exact to rounding;
    # nets with max-pooling have switches within the finite-difference step at random points
    torch.manual_seed(0)
    # built by hand, so attention is chosen by hand: the fused kernel has no second derivative
    bb = HFBackbone(HFBackboneConfig(model=str(hf_dirs["vit"]), attention="eager"), 3, 16)
    model = build_algorithm(algorithm_config({"name": name, "execution": "loop", **extra}), bb, n_outputs=3)
    model = model.to(torch.float64)
    data = synthetic_classes(n_classes=9, per_class=6, size=16)
    b = EpisodeSampler(data, 3, 2, 2, seed=0).sample(2)
    g = torch.Generator().manual_seed(1)
    rgb = lambda x: (x.expand(*x.shape[:2], 3, 16, 16) + 0.3 * torch.randn(*x.shape[:2], 3, 16, 16, generator=g)).double()  # noqa: E731
    batch = type(b)(rgb(b.support_x), b.support_y, rgb(b.query_x), b.query_y, b.n_ways)
    # a step of 1e-6 along directions of norm ~55 (3,000 weights): the O(h^2) term of central
    # differences stays below the tolerance, rounding (1e-16 / h) far below
    _assert_meta_gradient_matches_fd(model, batch, seed=3, h=1e-6)


def test_adapt_predict_and_serve_a_transformers_checkpoint(hf_dirs, tmp_path):
    import metafit

    tree = write_image_tree(tmp_path / "tree", n_classes=8, per_class=4, size=20, mode="RGB")
    raw = tiny_config(tmp_path / "run", data={"name": "folder", "root": str(tree), "image_size": 16,
                                              "val_fraction": 0.25, "test_fraction": 0.25},
                      task={"n_ways": 2, "k_shots": 1, "n_queries": 2},
                      eval={"n_ways": 2, "k_shots": 1, "n_queries": 2, "val_episodes": 3},
                      train={"meta_steps": 2, "eval_every": 2, "save_interval": 2})
    raw["backbone"] = {"name": "hf", "model": str(hf_dirs["resnet"])}
    cfg = make_config(raw)
    result = Trainer(cfg).fit()
    model = metafit.load(result.checkpoint)
    support = sorted((tree / "class00").iterdir())[:2] + sorted((tree / "class01").iterdir())[:2]
    task = model.adapt(support, ["a", "a", "b", "b"])
    pred = task.predict(sorted((tree / "class01").iterdir())[2:])
    assert set(pred.labels) <= {"a", "b"}
    from test_serve import serving
    import httpx

    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in support]
    with serving(result.checkpoint) as url, httpx.Client(base_url=url, timeout=30) as c:
        made = c.post("/tasks", files=files, data={"labels": ["a", "a", "b", "b"]}).json()
        got = c.post(f"/tasks/{made['task_id']}/predict", files=files[:1]).json()
    assert got["predictions"][0]["label"] in {"a", "b"}


def test_missing_or_bad_model_directory_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone.model must name a transformers model directory"):
        build_model(make_config({"data": {"name": "folder", "channels": 3, "image_size": 16},
                                 "backbone": {"name": "hf"}}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holding config.json; got .*empty"):
        build_model(make_config({"data": {"name": "folder", "channels": 3, "image_size": 16},
                                 "backbone": {"name": "hf", "model": str(tmp_path / "empty")}}))


def _import_error(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as err:  # torchvision built for another torch raises RuntimeError, not ImportError
        return f"{module} does not import here ({str(err).splitlines()[0][:120]}); the adapter code is " \
               "covered through the transformers backbone"
    return None


@pytest.mark.skipif(_import_error("timm") is not None, reason=str(_import_error("timm")))
def test_timm_backbone_meta_gradient_in_float64():
    from metafit.nn import TimmBackbone, TimmBackboneConfig

    torch.manual_seed(0)
    bb = TimmBackbone(TimmBackboneConfig(model="resnet10t", pretrained=False), 3, 16)
    model = build_algorithm(algorithm_config({"name": "maml", "execution": "loop", "inner_steps": 1}), bb, 3)
    model = model.to(torch.float64)
    data = synthetic_classes(n_classes=9, per_class=6, size=16)
    b = EpisodeSampler(data, 3, 2, 2, seed=0).sample(2)
    rgb = lambda x: x.expand(*x.shape[:2], 3, 16, 16).double()  # noqa: E731
    _assert_meta_gradient_matches_fd(model, type(b)(rgb(b.support_x), b.support_y, rgb(b.query_x), b.query_y, 3), 3)


@pytest.mark.skipif(_import_error("torchvision") is not None, reason=str(_import_error("torchvision")))
def test_torchvision_backbone_builds_by_name():
    cfg = backbone_config({"name": "torchvision", "model": "resnet18", "pretrained": False})
    from metafit.nn import build_backbone

    bb = build_backbone(cfg, 3, 32)
    assert bb.out_features == 512 and bb(torch.rand(2, 3, 32, 32)).shape == (2, 512)
