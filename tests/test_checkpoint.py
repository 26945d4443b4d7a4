"""Checkpoints: safetensors + JSON metadata, atomic, and refusing anything else without running it."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import metafit
from conftest import tiny_config
from metafit import CheckpointError
from metafit.training import build_model, make_config, read_checkpoint, save_checkpoint


@pytest.fixture
def saved(tmp_path):
    cfg = make_config(tiny_config(tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "ck" / "m.safetensors", model, cfg, step=7, metrics={"val": 0.5})
    return path, model, cfg


def test_load_rebuilds_a_ready_model(saved):
    path, model, cfg = saved
    loaded = metafit.load(path).algorithm
    assert not loaded.training
    assert loaded.run_config == cfg and loaded.checkpoint_meta["step"] == 7
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    meta, tensors = read_checkpoint(path)
    assert meta["format"] == "metafit-checkpoint" and meta["algorithm"] == "protonet"
    assert meta["config"]["backbone"]["hidden_channels"] == 8
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_truncated_file_is_refused(saved, tmp_path):
    path, _, _ = saved
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="unreadable or corrupted"):
        metafit.load(bad)


def test_foreign_safetensors_file_is_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="foreign safetensors file"):
        metafit.load(foreign)


def test_pickle_file_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        metafit.load(evil)
    torch_file = tmp_path / "model.pt"
    torch.save({"x": Evil()}, torch_file)
    with pytest.raises(CheckpointError):
        metafit.load(torch_file)
    assert not marker.exists()


def test_missing_file_and_wrong_version(saved, tmp_path):
    with pytest.raises(CheckpointError, match="existing checkpoint file"):
        metafit.load(tmp_path / "nope.safetensors")
    path, model, cfg = saved
    meta, tensors = read_checkpoint(path)
    meta["format_version"] = 99
    other = tmp_path / "v99.safetensors"
    save_file(tensors, str(other), metadata={"metafit": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="format_version must be 1; got 99"):
        metafit.load(other)


def test_tensors_that_do_not_match_the_config_are_refused(saved, tmp_path):
    path, _, _ = saved
    meta, tensors = read_checkpoint(path)
    meta["config"]["backbone"]["hidden_channels"] = 16
    other = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(other), metadata={"metafit": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="must match the shapes"):
        metafit.load(other)


def test_invalid_stored_config_is_refused(saved, tmp_path):
    path, _, _ = saved
    meta, tensors = read_checkpoint(path)
    meta["config"]["train"]["optimizer"] = "rmsprop"
    other = tmp_path / "badcfg.safetensors"
    save_file(tensors, str(other), metadata={"metafit": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="train.optimizer must be one of"):
        metafit.load(other)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Temp files are owner-only (0o600); the renamed result must be shareable like open()'s."""
    import os

    from metafit.data.cache import default_file_mode
    from metafit.training.metrics_log import write_json

    path = write_json(tmp_path / "r.json", {"a": 1})
    assert os.stat(path).st_mode & 0o777 == default_file_mode()
    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
    finally:
        os.umask(old)


def test_write_json_keeps_the_data_and_puts_a_curve_row_on_one_line(tmp_path):
    """Reports are read back unchanged; a list of rows takes a line per row, not one per number."""
    import json

    from metafit.training.metrics_log import write_json

    data = {"name": "run", "eval": {"mean": 1.5, "ci95": 0.1}, "curve": [[1, 2.5], [2, 3.5]],
            "rows": [{"it": 1, "val": 0.5}], "empty": [], "nested": {"deeper": {"x": [1, 2]}}}
    path = write_json(tmp_path / "r.json", data)
    text = path.read_text()
    assert json.loads(text) == data
    lines = text.splitlines()
    assert "  [1, 2.5]," in lines and "  [2, 3.5]" in lines
    assert ' "eval": {"mean": 1.5, "ci95": 0.1},' in lines
    assert '  {"it": 1, "val": 0.5}' in lines
