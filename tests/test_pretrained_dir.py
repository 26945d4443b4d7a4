"""Hugging Face style folders: ``Model.save_pretrained`` / ``metafit.Model.from_pretrained`` (a
local folder, or a Hub repo id through ``huggingface_hub``, here served from local fakes: a
monkeypatched ``snapshot_download`` and a hand-made Hub cache read offline by the real library),
and ``push_to_hub`` against a monkeypatched ``HfApi``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import metafit
from conftest import tiny_config, write_image_tree
from metafit import CheckpointError, ConfigError, DownloadError
from metafit.data import list_labelled_images
from metafit.training import build_model, make_config, read_checkpoint, save_checkpoint
from metafit.training.checkpoint import update_checkpoint_meta

hub = pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")

VAL = {"mean": 0.75, "ci95": 0.02, "std": 0.1, "episodes": 40, "loss": 0.7, "metric": "accuracy"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A last.safetensors-like checkpoint: weights, metrics, a calibration temperature, and
    resume state (optimizer tensors and train_state) that a published model leaves out."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = make_config(tiny_config(tmp / "run", algorithm={"name": "protonet"}))
    torch.manual_seed(0)
    model = build_model(cfg)
    first = next(iter(model.state_dict().values()))
    path = save_checkpoint(tmp / "last.safetensors", model, cfg, step=7,
                           metrics={"val": VAL, "train_seconds": 3.5},
                           extra_tensors={"optim.0.exp_avg": torch.zeros_like(first)},
                           extra_meta={"train_state": {"optimizer": "adam", "param_groups": [{"params": [0]}]}})
    return update_checkpoint_meta(path, {"calibration": {"temperature": 2.5}})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(support files, support labels, query files): one support and one query image per class."""
    root = write_image_tree(tmp_path_factory.mktemp("images"), n_classes=5, per_class=2, size=20)
    files, labels = list_labelled_images(root)
    support = [(f, f"kind-{lab}") for i, (f, lab) in enumerate(zip(files, labels)) if i % 2 == 0]
    query = [f for i, f in enumerate(files) if i % 2 == 1]
    return [f for f, _ in support], [lab for _, lab in support], query


def _predict(model, images):
    support, labels, query = images
    return model.adapt(support, labels).predict(query)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text.count(" must ") >= 1 and "; got " in text
    return text


def test_local_round_trip_predicts_the_same(tmp_path, checkpoint, images):
    original = metafit.load(checkpoint)
    want = _predict(original, images)
    folder = original.save_pretrained(tmp_path / "my-model")
    assert folder == tmp_path / "my-model"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for loaded in (metafit.Model.from_pretrained(folder), metafit.Model.from_pretrained(str(folder)),
                   metafit.load(folder), metafit.load(folder / "model.safetensors")):
        assert isinstance(loaded, metafit.Model)
        assert loaded.checkpoint == (folder / "model.safetensors").resolve()
        assert loaded.temperature == 2.5 and loaded.image_format == original.image_format
        assert loaded.config.to_dict() == original.config.to_dict()
        got = _predict(loaded, images)
        assert got.labels == want.labels
        assert torch.equal(got.probabilities, want.probabilities)
    # the published checkpoint keeps weights, metrics and calibration, not the resume state
    meta, tensors = read_checkpoint(folder / "model.safetensors")
    assert all(k.startswith("model.") for k in tensors) and "train_state" not in meta
    assert meta["metrics"] == {"val": VAL, "train_seconds": 3.5} and meta["step"] == 7
    assert meta["calibration"] == {"temperature": 2.5} and meta["metafit_version"] == metafit.__version__
    # a task adapted on the loaded model reloads against the folder
    task = metafit.Model.from_pretrained(folder).adapt(images[0], images[1])
    saved = task.save(tmp_path / "task.safetensors")
    again = metafit.load_task(saved, checkpoint=folder)
    assert torch.equal(again.predict(images[2]).probabilities, want.probabilities)


def test_config_json_and_model_card(tmp_path, checkpoint):
    model = metafit.load(checkpoint)
    folder = model.save_pretrained(tmp_path / "out")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    meta, _ = read_checkpoint(folder / "model.safetensors")
    assert config["config"] == meta["config"] == model.config.to_dict()
    assert config["metafit_version"] == metafit.__version__ and config["library_name"] == "metafit"
    assert config["algorithm"] == "protonet" and config["backbone"] == "conv4" and config["step"] == 7
    assert config["image_format"] == meta["image_format"] == {"size": 16, "channels": 1, "invert": False,
                                                              "fit": "squash"}
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: metafit\ntags:\n")
    for text in ("| Algorithm | protonet |", "| Backbone | conv4 |", "| Data | folder |",
                 "| Input | grayscale 16x16 |", "| Training episodes | 5-way 1-shot |", "| Training steps | 7 |",
                 "| Calibration temperature | 2.5 |", "- val: accuracy 0.7500 ± 0.0200 over 40 episodes",
                 'metafit.Model.from_pretrained("out")'):
        assert text in card
    # saving again replaces the generated card (here naming the repo) but keeps one the user wrote
    model.save_pretrained(folder, repo_id="user/repo")
    assert 'from_pretrained("user/repo")' in (folder / "README.md").read_text(encoding="utf-8")
    (folder / "README.md").write_text("# my own card\n", encoding="utf-8")
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text(encoding="utf-8") == "# my own card\n"
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]  # atomic writes leave nothing behind


def test_refusals_are_one_line(tmp_path, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    for call in (lambda: metafit.Model.from_pretrained(empty), lambda: metafit.load(empty)):
        with pytest.raises(CheckpointError, match="must hold model.safetensors") as err:
            call()
        assert str(empty) in _one_line(err)
    with pytest.raises(CheckpointError, match="neither an existing folder nor a repo id") as err:
        metafit.Model.from_pretrained("./no/such/folder")
    _one_line(err)
    with pytest.raises(CheckpointError, match="must be an existing checkpoint file"):
        metafit.Model.from_pretrained(tmp_path / "missing")  # a Path is always local, never a repo id
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="must be a folder metafit can write") as err:
        metafit.load(checkpoint).save_pretrained(blocker)
    _one_line(err)


class _FakeHub:
    """A Hub in a local folder: ``push`` uploads into ``remote/<repo_id>``, ``snapshot_download``
    copies the allowed files of a repo into a cache folder and returns it; calls are recorded."""

    def __init__(self, root: Path) -> None:
        self.remote, self.cache, self.calls = root / "remote", root / "cache", []

    def snapshot_download(self, repo_id, **kwargs):
        self.calls.append(("snapshot_download", repo_id, kwargs))
        source = self.remote / repo_id
        if not source.is_dir():
            raise hub.errors.LocalEntryNotFoundError(f"no repo {repo_id}\nsecond line")
        target = self.cache / repo_id / (kwargs.get("revision") or "main")
        target.mkdir(parents=True, exist_ok=True)
        for name in kwargs["allow_patterns"]:
            if (source / name).is_file():
                shutil.copy(source / name, target / name)
        return str(target)

    def api(self, fail: BaseException | None = None):
        fake = self

        class FakeApi:
            def create_repo(self, repo_id, **kwargs):
                fake.calls.append(("create_repo", repo_id, kwargs))
                if fail is not None:
                    raise fail
                return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"someone/{repo_id}"})()

            def upload_folder(self, **kwargs):
                fake.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
                target = fake.remote / kwargs["repo_id"]
                shutil.copytree(kwargs["folder_path"], target, dirs_exist_ok=True)
                return f"commit of {kwargs['repo_id']}"

        return FakeApi


def test_hub_download_from_a_fake_snapshot_download(tmp_path, checkpoint, images, monkeypatch):
    fake = _FakeHub(tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    original = metafit.load(checkpoint)
    original.save_pretrained(fake.remote / "user" / "repo")
    (fake.remote / "user" / "repo" / "extra.bin").write_bytes(b"not downloaded")
    model = metafit.Model.from_pretrained("user/repo", revision="v1", token="secret", cache_dir=tmp_path / "c")
    (name, repo_id, kwargs), = fake.calls
    assert (name, repo_id) == ("snapshot_download", "user/repo")
    assert kwargs["revision"] == "v1" and kwargs["token"] == "secret" and kwargs["cache_dir"] == str(tmp_path / "c")
    assert sorted(kwargs["allow_patterns"]) == ["config.json", "model.safetensors"]
    assert kwargs["library_name"] == "metafit" and kwargs["local_files_only"] is False
    assert model.checkpoint == (fake.cache / "user" / "repo" / "v1" / "model.safetensors").resolve()
    assert not (fake.cache / "user" / "repo" / "v1" / "extra.bin").exists()
    assert torch.equal(_predict(model, images).probabilities, _predict(original, images).probabilities)
    # a repo that is not there, and one without metafit weights
    with pytest.raises(DownloadError, match="'user/missing' must be a local folder or a Hugging Face Hub") as err:
        metafit.Model.from_pretrained("user/missing")
    assert "LocalEntryNotFoundError (no repo user/missing)" in _one_line(err)
    (fake.remote / "user" / "other").mkdir()
    (fake.remote / "user" / "other" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Hub repo 'user/other' must hold model.safetensors") as err:
        metafit.Model.from_pretrained("user/other")
    _one_line(err)


def _hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "c0ffee" * 6 + "abcd") -> str:
    """The layout huggingface_hub keeps downloads in (models--user--name/refs, snapshots)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(folder / name, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_offline_from_a_local_cache_with_the_real_library(tmp_path, checkpoint, images):
    original = metafit.load(checkpoint)
    folder = original.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub-cache"
    commit = _hub_cache(cache, "user/repo", folder)
    want = _predict(original, images).probabilities
    for revision in (None, commit):
        model = metafit.Model.from_pretrained("user/repo", cache_dir=cache, local_files_only=True, revision=revision)
        assert model.checkpoint == (cache / "models--user--repo" / "snapshots" / commit /
                                    "model.safetensors").resolve()
        assert torch.equal(_predict(model, images).probabilities, want)
    with pytest.raises(DownloadError, match="'user/missing' must be a local folder") as err:
        metafit.Model.from_pretrained("user/missing", cache_dir=cache, local_files_only=True)
    assert "LocalEntryNotFoundError" in _one_line(err)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, checkpoint, images, monkeypatch):
    fake = _FakeHub(tmp_path)
    monkeypatch.setattr(hub, "HfApi", fake.api())
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    original = metafit.load(checkpoint)
    info = original.push_to_hub("repo", private=True, token="secret", commit_message="first")
    assert info == "commit of someone/repo"
    (c_name, c_id, c_kw), (u_name, u_id, u_kw) = fake.calls
    assert (c_name, c_id, c_kw["exist_ok"], c_kw["private"], c_kw["token"]) == ("create_repo", "repo", True, True,
                                                                             "secret")
    assert (u_name, u_id, u_kw["commit_message"], u_kw["token"]) == ("upload_folder", "someone/repo", "first",
                                                                     "secret")
    assert not Path(u_kw["folder_path"]).exists()  # the temporary folder is gone
    uploaded = fake.remote / "someone" / "repo"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("someone/repo")' in (uploaded / "README.md").read_text(encoding="utf-8")
    model = metafit.Model.from_pretrained("someone/repo")
    assert torch.equal(_predict(model, images).probabilities, _predict(original, images).probabilities)


def test_push_to_hub_failures(tmp_path, checkpoint, monkeypatch):
    fake = _FakeHub(tmp_path)
    model = metafit.load(checkpoint)
    monkeypatch.setattr(hub, "HfApi", fake.api(hub.errors.LocalTokenNotFoundError("Token is required.")))
    with pytest.raises(DownloadError, match="push_to_hub must reach a Hub repo") as err:
        model.push_to_hub("user/repo")
    assert "LocalTokenNotFoundError" in _one_line(err) and "token" in str(err.value)
    monkeypatch.setattr(hub, "HfApi", fake.api(TypeError("a bug, not the Hub")))
    with pytest.raises(TypeError, match="a bug"):  # not disguised as a Hub failure
        model.push_to_hub("user/repo")


def test_without_huggingface_hub_the_hub_needs_the_extra(tmp_path, checkpoint, monkeypatch):
    model = metafit.load(checkpoint)
    folder = model.save_pretrained(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    assert metafit.Model.from_pretrained(folder).config.to_dict() == model.config.to_dict()  # local: no hub
    for call in (lambda: metafit.Model.from_pretrained("user/repo"), lambda: model.push_to_hub("user/repo")):
        with pytest.raises(ConfigError, match=r'pip install "metafit\[hub\]"') as err:
            call()
        assert "Model: the huggingface_hub package must be installed" in _one_line(err)
