"""ONNX export of adapted tasks (`metafit export`): onnxruntime gives PyTorch's outputs on the
query set of an episode for every kind of adapted state, at any batch size, with the
preprocessing in the graph's metadata."""

from __future__ import annotations

import sys

import pytest
import torch

import metafit
from conftest import synthetic_classes, tiny_config, write_image_tree
from metafit import ConfigError, MetafitError, TaskError
from metafit.cli.main import main
from metafit.data import list_labelled_images
from metafit.training import build_model, make_config, save_checkpoint

ort = pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install "metafit[onnx]")')
onnx = pytest.importorskip("onnx", reason='onnx is not installed (pip install "metafit[onnx]")')
pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install "metafit[onnx]")')

from metafit.inference.export import ExportError, export_onnx, export_spec, read_onnx_metadata  # noqa: E402

N_WAYS, K_SHOTS, N_QUERIES = 5, 2, 4
TOL = 1e-5  # on logits of unit scale; relative to the largest logit beyond (float32 rounding grows with it)


def _checkpoint(tmp_path, name, data=None, **alg):
    """A freshly initialised tiny model whose BatchNorm running statistics are those of the
    synthetic images (as after training: features of unit scale, so logits are not all ~0 and a
    wrong graph cannot pass the 1e-5 comparison)."""
    sections = {"algorithm": {"name": name, **alg}}
    if data:
        sections["data"] = data
    cfg = make_config(tiny_config(tmp_path / "run", **sections))
    torch.manual_seed(0)
    model = build_model(cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    if bns:
        x = synthetic_classes(n_classes=8, per_class=4, size=16, seed=1).images.float() / 255
        x = x.expand(-1, cfg.data.in_channels, -1, -1)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the one pass
        model.train()
        with torch.no_grad():
            model.backbone(x)
        for m in bns:
            m.momentum = 0.1
        bank = getattr(model, "stats", None)  # MAML's per-step statistics start as copies of these
        for k in range(bank.n_steps if bank is not None else 0):
            for full in bank.names:
                getattr(bank, bank._key(k, full)).copy_(model.get_buffer(full))
        model.eval()
    return save_checkpoint(tmp_path / f"{name}.safetensors", model, cfg, step=1)


def _episode(channels: int = 1):
    """Support [N_WAYS * K_SHOTS] and query [N_WAYS * N_QUERIES] images of 5 synthetic classes
    (float [0, 1], [N, C, 16, 16]) with the support labels."""
    data = synthetic_classes(n_classes=N_WAYS, per_class=K_SHOTS + N_QUERIES, size=16)
    x = data.images.float() / 255
    if channels == 3:
        x = torch.cat([x, x.flip(-1), 1 - x], dim=1)
    per = K_SHOTS + N_QUERIES
    s_idx = [c * per + i for c in range(N_WAYS) for i in range(K_SHOTS)]
    q_idx = [c * per + i for c in range(N_WAYS) for i in range(K_SHOTS, per)]
    labels = [f"class-{c}" for c in range(N_WAYS) for _ in range(K_SHOTS)]
    return x[s_idx], labels, x[q_idx]


def _run(path, images: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = session.run(["logits", "probabilities"], {"images": images.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(probs)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """|got - want| <= 1e-5 where the logits are of unit scale, 1e-5 * max |logit| beyond."""
    return _max_diff(got, want) <= TOL * max(1.0, float(want.abs().max()))


CASES = [
    ("protonet", {}, None),
    ("protonet", {"distance": "cosine"}, {"channels": 3, "normalize": "imagenet"}),
    ("transfer", {"n_base_classes": 6, "head": "linear", "head_steps": 5}, None),
    ("transfer", {"n_base_classes": 6, "head": "cosine", "head_steps": 5}, None),
    ("transfer", {"n_base_classes": 6, "head": "centroid"}, None),
    ("svm", {}, None),
    ("ridge", {}, None),
    ("maml", {"eval_inner_steps": 2, "inner_lr": 0.05}, None),  # transductive BatchNorm (default): batch statistics
    ("maml", {"eval_inner_steps": 2, "inner_lr": 0.05, "bn_mode": "per_step"}, None),  # statistics of the last step
    ("anil", {"eval_inner_steps": 2, "inner_lr": 0.05}, None),
]


@pytest.mark.parametrize("name,alg,data", CASES,
                         ids=[f"{n}-{a.get('head') or a.get('distance') or a.get('bn_mode') or 'default'}"
                              for n, a, _ in CASES])
def test_onnxruntime_gives_pytorchs_outputs_on_the_query_set(tmp_path, name, alg, data):
    model = metafit.load(_checkpoint(tmp_path, name, data, **alg))
    channels = model.image_format.channels
    support, labels, queries = _episode(channels)
    task = model.adapt(support, labels)
    path = export_onnx(task, tmp_path / "task.onnx")
    assert path == tmp_path / "task.onnx" and path.is_file()

    logits, probs = _run(path, queries)
    want = task.logits(queries)
    print(f"\n{name} {alg}: max |onnxruntime - pytorch| logits {_max_diff(logits, want):.3g} (largest logit "
          f"{float(want.abs().max()):.3g}), probabilities {_max_diff(probs, task.predict(queries).probabilities):.3g}")
    assert logits.shape == want.shape == (N_WAYS * N_QUERIES, N_WAYS)
    assert _close(logits, want)
    assert _max_diff(probs, task.predict(queries).probabilities) <= TOL
    assert 0.05 < float(want.std()) and float(want.abs().max()) < 100  # a sound task, not one any graph would match
    # the batch axis is dynamic: one image, and an odd batch, give PyTorch's outputs for that batch
    for batch in (queries[:1], queries[3:10]):
        assert _close(_run(path, batch)[0], task.logits(batch))

    meta = read_onnx_metadata(path)
    assert meta["class_names"] == [f"class-{c}" for c in range(N_WAYS)]
    assert meta["algorithm"] == name and meta["version"] == metafit.__version__
    assert meta["image_format"] == {"size": 16, "channels": channels, "invert": False, "fit": "squash"}
    assert meta["input"] == {"name": "images", "dtype": "float32", "shape": ["N", channels, 16, 16],
                             "range": [0.0, 1.0]}
    assert "divide by 255" in meta["preprocessing"]
    assert meta["batch_statistics"] is (name in ("maml", "anil") and alg.get("bn_mode") != "per_step")
    if data and data.get("normalize") == "imagenet":
        assert meta["normalization"]["in_graph"] is True
        assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
        assert "do not normalise" in meta["preprocessing"]
    else:
        assert meta["normalization"] == {"in_graph": False}
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", channels, 16, 16]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]


def test_fine_tuned_weights_and_the_calibrated_temperature_are_in_the_graph(tmp_path):
    model = metafit.load(_checkpoint(tmp_path, "protonet", finetune_steps=2))
    support, labels, queries = _episode()
    task = model.adapt(support, labels)
    assert task.adapted.params is not None
    untuned = metafit.load(_checkpoint(tmp_path / "plain", "protonet")).adapt(support, labels)
    assert _max_diff(untuned.logits(queries), task.logits(queries)) > 1e-3  # the tuned weights matter
    model.temperature = 2.5
    path = export_onnx(task, tmp_path / "tuned.onnx")
    logits, probs = _run(path, queries)
    assert _close(logits, task.logits(queries))
    assert _max_diff(probs, torch.softmax(task.logits(queries) / 2.5, -1)) <= TOL
    assert _max_diff(probs, task.predict(queries).probabilities) <= TOL
    assert read_onnx_metadata(path)["temperature"] == 2.5


def test_an_untraceable_predict_is_one_line_naming_the_algorithm(tmp_path, monkeypatch):
    model = metafit.load(_checkpoint(tmp_path, "protonet"))
    support, labels, _ = _episode()
    task = model.adapt(support, labels)
    out = tmp_path / "task.onnx"
    out.write_bytes(b"an earlier export")
    original = model.algorithm.predict

    def data_dependent(adapted, x):  # Python control flow on tensor values: torch.export cannot trace it
        logits = original(adapted, x)
        return logits if float(logits.sum()) > 0 else -logits

    monkeypatch.setattr(model.algorithm, "predict", data_dependent)
    with pytest.raises(ExportError) as info:
        export_onnx(task, out)
    msg = str(info.value)
    assert msg.startswith("Export: protonet's predict must be traceable by torch.export") and "\n" not in msg
    assert isinstance(info.value, MetafitError)
    assert out.read_bytes() == b"an earlier export"  # nothing half-written


def test_missing_packages_and_bad_options_are_one_line_errors(tmp_path, monkeypatch):
    model = metafit.load(_checkpoint(tmp_path, "protonet"))
    support, labels, _ = _episode()
    task = model.adapt(support, labels)
    with pytest.raises(ConfigError, match=r"opset must be an integer in 18\.\."):
        export_onnx(task, tmp_path / "a.onnx", opset=9)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    with pytest.raises(ExportError, match=r'package onnxscript must be installed.*pip install "metafit\[onnx\]"'):
        export_onnx(task, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    monkeypatch.setattr(model, "image_format", None)  # a model of vectors (e.g. sinusoid regression)
    with pytest.raises(TaskError, match="must belong to an image model"):
        export_spec(task)


def test_cli_exports_a_checkpoint_with_support_and_a_saved_task(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "svm")
    support = write_image_tree(tmp_path / "support", n_classes=4, per_class=2, size=20)
    files, labels = list_labelled_images(support)
    queries, _ = list_labelled_images(write_image_tree(tmp_path / "queries", n_classes=4, per_class=2, seed=1))
    want = metafit.load(ckpt).adapt(files, labels)

    out = tmp_path / "from-ckpt.onnx"
    assert main(["export", str(ckpt), "--support", str(support), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert "input: images float32 [N, 1, 16, 16] in [0, 1]" in printed
    assert "preprocessing: decode the image and convert it to grayscale" in printed
    x = want.model.images(queries)  # the conversion the metadata describes
    logits, _ = _run(out, x)
    assert _close(logits, want.logits(x))
    assert read_onnx_metadata(out)["class_names"] == list(want.class_names)

    task_file = tmp_path / "task.safetensors"
    assert main(["adapt", str(ckpt), "--support", str(support), "--out", str(task_file)]) == 0
    out2 = tmp_path / "from-task.onnx"
    assert main(["export", str(task_file), "--out", str(out2), "--format", "onnx"]) == 0
    assert str(out2) in capsys.readouterr().out
    assert _close(_run(out2, x)[0], want.logits(x))

    # a checkpoint without --support, a task with --support, an unknown format: one line, exit 1
    for argv, needle in [(["export", str(ckpt), "--out", str(tmp_path / "x.onnx")], "needs --support DIR"),
                         (["export", str(task_file), "--support", str(support), "--out", str(tmp_path / "x.onnx")],
                          "--support must not be given with a saved task"),
                         (["export", str(task_file), "--out", str(tmp_path / "x.onnx"), "--format", "tflite"],
                          "invalid choice")]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


def test_cli_names_the_extra_when_onnx_is_missing(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path, "protonet")
    support = write_image_tree(tmp_path / "support", n_classes=3, per_class=1, size=16)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(ckpt), "--support", str(support), "--out", str(tmp_path / "t.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "metafit[onnx]"' in err and "onnxruntime" in err
    assert not (tmp_path / "t.onnx").exists()
