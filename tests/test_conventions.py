"""What a new user trips over (issue 38, items 5-6): `metafit configs --fields [NAME]` shows every
algorithm's, backbone's and data source's fields; misspelt keys and names get a "did you mean"
suggestion; images of floats in 0-255 (or NaN) are refused instead of predicted wrongly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import metafit
from conftest import tiny_config, write_image_tree
from metafit import ConfigError, DataError
from metafit.algorithms import ALGORITHMS
from metafit.cli.main import main
from metafit.data import DATASETS, ImageFormat, list_labelled_images
from metafit.nn import BACKBONES
from metafit.training import build_model, make_config, save_checkpoint
from metafit.validation import did_you_mean

REGISTRIES = {"algorithm": {k: v.Config for k, v in ALGORITHMS.items()},
              "backbone": {k: v[0] for k, v in BACKBONES.items()},
              "data": dict(DATASETS)}


def _blocks(text: str) -> dict[str, list[str]]:
    """``metafit configs --fields`` output as {header: [keys]} (headers up to their ':')."""
    blocks: dict[str, list[str]] = {}
    header = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            header = re.match(r"\w+( \([^)]*\))?", line).group(0)
            blocks[header] = []
        else:
            blocks[header].append(line.split()[0])
    return blocks


def test_fields_lists_every_algorithm_backbone_and_data_source(capsys):
    assert main(["configs", "--fields"]) == 0
    blocks = _blocks(capsys.readouterr().out)
    for section, registry in REGISTRIES.items():
        default = getattr(make_config({}), section).name
        for name, cls in registry.items():
            header = f"{section} (name: {name}{', the default' if name == default else ''})"
            assert blocks[header] == [f"{section}.{k}" for k in cls.model_fields if k != "name"], header
    # the keys a new user looks for first
    assert "algorithm.inner_lr" in blocks["algorithm (name: maml)"]
    assert "algorithm.head" in blocks["algorithm (name: transfer)"]
    assert {"backbone.channels", "backbone.drop_rate"} <= set(blocks["backbone (name: resnet12)"])
    assert "train.meta_lr" in blocks["train"] and "seed" in blocks["run (top-level keys)"]


@pytest.mark.parametrize("name,header", [("maml", "algorithm (name: maml)"), ("resnet12", "backbone (name: resnet12)"),
                                         ("folder", "data (name: folder)"), ("train", "train")])
def test_fields_of_one_name(capsys, name, header):
    assert main(["configs", "--fields", name]) == 0
    assert list(_blocks(capsys.readouterr().out)) == [header]


def test_fields_of_an_unknown_name_lists_the_valid_ones(capsys):
    assert main(["configs", "--fields", "resnet"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.count("\n") == 1
    assert err.startswith("error: Configs: --fields NAME must name an algorithm, backbone, data source or config "
                          "section (")
    assert "algorithms: protonet, maml," in err and "backbones: conv4, mlp, resnet12" in err
    assert "data sources: omniglot, folder," in err
    assert "got 'resnet'. Did you mean 'resnet12'?" in err


@pytest.mark.parametrize("config,message", [
    ({"tain": {}}, "unknown key 'tain'; valid keys here: seed, out_dir, data, task, eval, augment, algorithm, "
                   "backbone, train, monitor. Did you mean 'train'? Remove the key or fix its spelling."),
    ({"train": {"optimiser": "adam"}}, "Did you mean 'optimizer'? Remove the key"),
    ({"algorithm": {"name": "maml", "inner_lrr": 0.1}}, "unknown key 'algorithm.inner_lrr'; valid keys here: name, "
                                                       "inner_lr,"),
    ({"algorithm": {"name": "maml", "inner_lrr": 0.1}}, ". Did you mean 'inner_lr'"),
    ({"train": {"optimizer": "adamw"}}, "train.optimizer must be one of 'adam' or 'sgd'; got 'adamw'. Did you mean "
                                        "'adam'? Choose one of the listed values."),
    ({"algorithm": {"name": "maml", "bn_mode": "perstep"}}, "got 'perstep'. Did you mean 'per_step'?"),
    ({"algorithm": {"name": "mamll"}}, "algorithm.name must be one of ['anil', 'maml', 'metasgd', 'protonet', "
                                       "'reptile', 'ridge', 'svm', 'transfer']; got 'mamll'. Did you mean 'maml'? "
                                       "Choose one of the listed algorithm names."),
    ({"algorithm": "ProtoNet"}, "got 'ProtoNet'. Did you mean 'protonet'?"),
    ({"backbone": {"name": "resnet"}}, "got 'resnet'. Did you mean 'resnet12'?"),
    ({"data": {"name": "tinyimagenet"}}, "got 'tinyimagenet'. Did you mean 'tiny_imagenet'"),
])
def test_misspelt_keys_and_names_get_a_suggestion(config, message):
    with pytest.raises(ConfigError) as info:
        make_config(config)
    assert message in str(info.value), str(info.value)


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(ConfigError) as info:
        make_config({"train": {"optimizer": "lbfgs"}})
    assert "got 'lbfgs'. Choose one of the listed values." in str(info.value)
    assert did_you_mean("zzz", ["adam", "sgd"]) == "" and did_you_mean(3, ["adam"]) == ""
    assert did_you_mean("Adam", ["adam", "sgd"]) == " Did you mean 'adam'?"


FMT = ImageFormat(16, 1, False)


@pytest.mark.parametrize("images,where", [
    (torch.rand(3, 1, 16, 16) * 255, "image 0 (torch.float32)"),  # a converted-looking batch
    (torch.cat([torch.rand(2, 1, 16, 16), 255 * torch.rand(1, 1, 16, 16)]), "image 2 (torch.float32)"),
    (torch.rand(1, 16, 16) * 255, "image 0 (torch.float32)"),  # one image at the model's shape
    (torch.rand(3, 20, 20) * 255, "image 0 (float32)"),  # an RGB tensor of another size
    (np.random.default_rng(0).random((20, 20, 3)) * 255, "image 0 (float64)"),
    ([np.random.default_rng(0).random((20, 20)), np.random.default_rng(1).random((20, 20)) * 255],
     "image 1 (float64)"),
])
def test_float_images_in_0_255_are_refused(images, where):
    with pytest.raises(DataError) as info:
        FMT.convert(images)
    msg = str(info.value)
    assert msg.startswith(f"Images: {where} must hold float values in [0, 1]; got values from ")
    assert msg.endswith("Divide 0-255 values by 255 (x / 255.0), or pass them as uint8 (numpy: x.astype(np.uint8); "
                        "torch: x.to(torch.uint8)).") and "\n" not in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_pixels_are_refused(bad):
    x = torch.rand(2, 1, 16, 16)
    x[1, 0, 3, 4] = bad
    with pytest.raises(DataError, match=r"^Images: image 1 \(torch.float32\) must hold float values in \[0, 1\]; "
                                        r"got NaN or infinite values\. Replace them"):
        FMT.convert(x)
    arr = np.random.default_rng(0).random((20, 20))
    arr[0, 0] = bad
    with pytest.raises(DataError, match="got NaN or infinite values"):
        FMT.convert(arr)


def test_uint8_and_scaled_floats_still_convert_alike():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    ref = FMT.convert(rgb)
    for item in (rgb.astype(np.float32) / 255.0, torch.from_numpy(rgb), rgb.astype(np.int64),
                 torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0):
        torch.testing.assert_close(FMT.convert([item]), ref, atol=1 / 255 + 1e-6, rtol=0)
    edge = torch.rand(2, 1, 16, 16).clamp(0, 1)
    edge[0, 0, 0, 0], edge[1, 0, 0, 0] = 1.0 + 5e-4, -5e-4  # rounding noise of a division by 255: accepted
    assert torch.equal(FMT.convert(edge), edge)
    with pytest.raises(DataError, match=r"^Images: image 0 \(int64\) must hold integer values in 0-255; got values "
                                        r"from 0 to 300\."):
        FMT.convert(np.full((20, 20), 300, dtype=np.int64) * np.eye(20, dtype=np.int64))


def test_model_adapt_and_predict_refuse_unscaled_floats(tmp_path):
    support = write_image_tree(tmp_path / "support", n_classes=3, per_class=1, size=16)
    cfg = make_config(tiny_config(tmp_path / "run"))
    torch.manual_seed(0)
    model = metafit.load(save_checkpoint(tmp_path / "m.safetensors", build_model(cfg), cfg, step=1))
    files, labels = list_labelled_images(support)
    x = model.images(files)  # [3, 1, 16, 16] in [0, 1]
    with pytest.raises(DataError, match=r"^Images: image 0 \(torch.float32\) must hold float values in \[0, 1\]"):
        model.adapt(x * 255, labels)
    task = model.adapt(x, labels)
    assert task.predict(x).labels == labels
    with pytest.raises(DataError, match="Divide 0-255 values by 255"):
        task.predict(x * 255)
    assert task.predict(list((x * 255).round().to(torch.uint8).numpy()[:, 0])).labels == labels  # uint8: 0-255


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`metafit configs --fields | head -1`: no error line when head closes the pipe."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "from metafit.cli.main import entrypoint; entrypoint()",
                             "configs", "--fields"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as head does after its first line; here before the first (the child is still importing)
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 141 and stderr == "", stderr
