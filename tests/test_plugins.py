"""A backbone registered by the user's own module works from the command line through
METAFIT_PLUGINS, and a checkpoint naming an unregistered one says what to import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import write_image_tree
from metafit import ConfigError
from metafit.plugins import load_plugins

PLUGIN = '''
from torch import nn
from metafit.nn import register_backbone


@register_backbone("plugin-cnn")
class PluginCNN(nn.Module):
    def __init__(self, in_channels: int, width: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten())
        self.out_features = 4 * width

    def forward(self, x):
        return self.net(x)
'''


def _metafit(args, tmp_path, plugins=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "METAFIT_PLUGINS": "my_plugin" if plugins else ""}
    return subprocess.run([sys.executable, "-c", "from metafit.cli.main import entrypoint; entrypoint()", *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True)


def test_commands_use_a_backbone_a_plugin_registers(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    root = write_image_tree(tmp_path / "images", n_classes=8, per_class=4, size=16)
    (tmp_path / "run.yaml").write_text(
        f"out_dir: {tmp_path / 'run'}\ndata: {{name: folder, root: {root}, image_size: 16, val_fraction: 0.25, "
        "test_fraction: 0.25}\nbackbone: {name: plugin-cnn, width: 3}\ntask: {n_ways: 2, k_shots: 1, n_queries: 1}\n"
        "eval: {n_ways: 2, k_shots: 1, n_queries: 1, val_episodes: 4, test_episodes: 4}\n"
        "train: {meta_steps: 2, eval_every: 2, save_interval: 2, progress: false}\n")
    fields = _metafit(["configs", "--fields", "plugin-cnn"], tmp_path)
    assert fields.returncode == 0 and "width" in fields.stdout, fields.stderr
    trained = _metafit(["train", "run.yaml"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    info = _metafit(["info", str(tmp_path / "run" / "best.safetensors")], tmp_path)
    assert info.returncode == 0 and "plugin-cnn" in info.stdout, info.stderr
    # without the plugin: one line that says what to import
    bare = _metafit(["info", str(tmp_path / "run" / "best.safetensors")], tmp_path, plugins=False)
    assert bare.returncode == 1 and len(bare.stderr.strip().splitlines()) == 1
    assert "'plugin-cnn'" in bare.stderr and "METAFIT_PLUGINS" in bare.stderr, bare.stderr


def test_a_plugin_that_does_not_import_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"Plugins: 'no_such_plugin_module' must be an importable module"):
        load_plugins(["no_such_plugin_module"])
    run = _metafit(["configs"], tmp_path)  # METAFIT_PLUGINS=my_plugin, but there is no such file here
    assert run.returncode == 1 and run.stderr.startswith("error: Plugins: 'my_plugin' must be an importable module")
