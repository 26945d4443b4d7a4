"""Omniglot reading: a synthetic archive in the official layout, and the real zips when present."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from metafit import DataError
from metafit.data import load_omniglot, omniglot_splits
from metafit.data.omniglot import find_omniglot


def make_zip(path, split="images_background", alphabets=("Alpha", "Beta"), chars=3, drawers=4, seed=0):
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as z:
        for a in alphabets:
            for c in range(1, chars + 1):
                for d in range(1, drawers + 1):
                    arr = np.full((105, 105), 255, np.uint8)
                    x = rng.integers(10, 80)
                    arr[20:80, x:x + 8] = 0  # a black stroke (ink) on white
                    buf = io.BytesIO()
                    Image.fromarray(arr).convert("1").save(buf, "PNG")
                    z.writestr(f"{split}/{a}/character{c:02d}/{c:04d}_{d:02d}.png", buf.getvalue())
    return path


def test_reads_official_layout_with_ink_high_and_alphabets(tmp_path):
    make_zip(tmp_path / "images_background.zip")
    data = load_omniglot("background", tmp_path, image_size=28)
    assert data.n_classes == 6 and data.n_images == 24
    assert data.images.shape == (24, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.group_names == ("Alpha", "Beta")
    assert data.class_names[0] == "Alpha/character01"
    assert data.class_group.tolist() == [0, 0, 0, 1, 1, 1]
    img = data.images[0, 0].float() / 255
    assert img.mean() < 0.3 and img.max() > 0.9  # background 0, ink 1


def test_image_size_is_configurable(tmp_path):
    make_zip(tmp_path / "images_background.zip")
    assert load_omniglot("background", tmp_path, image_size=20).images.shape[-2:] == (20, 20)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFIT_CACHE_DIR", str(tmp_path / "cache"))
    src = make_zip(tmp_path / "images_background.zip")
    first = load_omniglot("background", tmp_path)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = load_omniglot("background", tmp_path)
    assert torch.equal(first.images, again.images)
    assert files[0].stat().st_mtime_ns == mtime  # read from cache, not rewritten
    make_zip(src, chars=2, seed=1)  # the source changes
    changed = load_omniglot("background", tmp_path)
    assert changed.n_classes == 4
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_damaged_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFIT_CACHE_DIR", str(tmp_path / "cache"))
    make_zip(tmp_path / "images_background.zip")
    load_omniglot("background", tmp_path)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"garbage")
    assert load_omniglot("background", tmp_path).n_classes == 6


def test_missing_folder_and_bad_zip_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("METAFIT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="images_background.zip.*METAFIT_DATA_DIR"):
        load_omniglot("background", tmp_path)
    (tmp_path / "images_background.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="readable zip archive"):
        load_omniglot("background", tmp_path)
    with pytest.raises(DataError, match="protocol must be one of"):
        omniglot_splits("nope", tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    make_zip(tmp_path / "images_background.zip")
    monkeypatch.setenv("METAFIT_DATA_DIR", str(tmp_path))
    assert find_omniglot(None, parts=("background",)) == tmp_path
    assert load_omniglot("background").n_classes == 6


# -- the real archives ----------------------------------------------------------------------


def test_real_archives_counts(omniglot_dir):
    bg = load_omniglot("background", omniglot_dir)
    ev = load_omniglot("evaluation", omniglot_dir)
    assert (bg.n_classes, bg.n_images, len(bg.group_names)) == (964, 19280, 30)
    assert (ev.n_classes, ev.n_images, len(ev.group_names)) == (659, 13180, 20)
    assert bg.images.shape[1:] == (1, 28, 28)
    mean_ink = bg.images[:500].float().mean() / 255
    assert 0.02 < mean_ink < 0.3  # mostly background (0) with ink (1)


def test_real_protocol_splits(omniglot_dir):
    v = omniglot_splits("vinyals", omniglot_dir)
    assert [v[s].n_classes for s in ("train", "val", "test")] == [1028, 172, 423]
    names = [set(v[s].class_names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    lake = omniglot_splits("lake", omniglot_dir)
    assert lake["train"].n_classes + lake["val"].n_classes == 964 and lake["test"].n_classes == 659
    assert not set(lake["train"].group_names) & set(lake["val"].group_names)
    small = omniglot_splits("small", omniglot_dir)
    s1 = omniglot_splits("small1", omniglot_dir)
    assert s1["train"].n_classes + s1["val"].n_classes == 136
    # Greek (24) and Latin (26) are in both minimal sets and count once
    assert small["train"].n_classes + small["val"].n_classes == 136 + 156 - 24 - 26
