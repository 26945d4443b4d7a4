"""Users' own data: class-per-folder trees, and the one-line errors for bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image_tree
from metafit import DataError
from metafit.data import DataConfig, EpisodeSampler, load_image_folder, load_splits


def test_reads_flat_tree(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=3, size=20)
    data = load_image_folder(root, image_size=16)
    assert data.n_classes == 4 and data.n_images == 12
    assert data.images.shape == (12, 1, 16, 16)
    assert data.class_names == ("class00", "class01", "class02", "class03")


def test_reads_grouped_tree_with_groups(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=6, per_class=3, groups=2)
    data = load_image_folder(root, image_size=16)
    assert data.group_names == ("group0", "group1")
    assert data.class_names[0] == "group0/class00"
    s = EpisodeSampler(data, 3, 1, 1, within_group=True)
    assert len(data.class_group[s.sample_episode().classes].unique()) == 1


def test_rgb_images_give_three_channels(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2, mode="RGB")
    assert load_image_folder(root, image_size=8).images.shape[1] == 3
    assert load_image_folder(root, image_size=8, channels=1).images.shape[1] == 1


def test_unreadable_image_names_the_file(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    (root / "class01" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"broken\.png' must be a readable image.*Remove or replace"):
        load_image_folder(root)


def test_empty_class_names_the_class(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    (root / "empty_one").mkdir()
    with pytest.raises(DataError, match="class 'empty_one' must contain at least one image"):
        load_image_folder(root)


def test_class_with_too_few_images_names_the_class(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=5, per_class=4)
    os.remove(root / "class03" / "img00.png")
    os.remove(root / "class03" / "img01.png")
    data = load_image_folder(root)
    with pytest.raises(DataError, match="class 'class03' must have at least k_shots \\+ n_queries = 3 images; got 2"):
        EpisodeSampler(data, 3, 1, 2)


def test_fewer_classes_than_ways(tmp_path):
    data = load_image_folder(write_image_tree(tmp_path / "data", n_classes=3, per_class=4))
    with pytest.raises(DataError, match="at least n_ways = 5 classes; got 3. Lower n_ways"):
        EpisodeSampler(data, 5, 1, 1)


def test_mixed_image_modes_are_refused_with_the_fix(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8), "RGB").save(root / "class02" / "colour.png")
    with pytest.raises(DataError, match="must share one mode.*set data.channels to 1 or 3"):
        load_image_folder(root)
    assert load_image_folder(root, channels=1).n_images == 7


def test_mixed_layout_and_missing_root(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=2, per_class=2, groups=1)
    (root / "lonely").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "lonely" / "a.png")
    with pytest.raises(DataError, match="either root/<class>/<image> or root/<group>/<class>/<image>"):
        load_image_folder(root)
    with pytest.raises(DataError, match="root must be an existing directory"):
        load_image_folder(tmp_path / "nope")


def test_cache_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFIT_CACHE_DIR", str(tmp_path / "cache"))
    root = write_image_tree(tmp_path / "data", n_classes=2, per_class=2)
    first = load_image_folder(root, image_size=8)
    img = root / "class00" / "img00.png"
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(img)
    os.utime(img, ns=(1, 1))
    second = load_image_folder(root, image_size=8)
    assert not torch.equal(first.images, second.images)
    assert int(second.images[0].min()) == 255


def test_splits_from_fractions_and_from_subfolders(tmp_path):
    root = write_image_tree(tmp_path / "flat", n_classes=20, per_class=3)
    s = load_splits(DataConfig(name="folder", root=str(root), val_fraction=0.2, test_fraction=0.3))
    assert [s[k].n_classes for k in ("train", "val", "test")] == [10, 4, 6]
    assert not set(s["train"].class_names) & set(s["test"].class_names)
    for split in ("train", "val", "test"):
        write_image_tree(tmp_path / "tree" / split, n_classes=3, per_class=2, seed=hash(split) % 100)
    s2 = load_splits(DataConfig(name="folder", root=str(tmp_path / "tree")))
    assert [s2[k].n_classes for k in ("train", "val", "test")] == [3, 3, 3]
    with pytest.raises(DataError, match="data.root must be the folder"):
        load_splits(DataConfig(name="folder"))


def test_stray_entries_are_named_not_taken_for_groups(tmp_path):
    flat = write_image_tree(tmp_path / "flat", n_classes=3, per_class=2)
    (flat / "class02" / "nested").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(flat / "class02" / "nested" / "a.png")
    with pytest.raises(DataError, match=r"^Image folder: class folder 'class02' must hold only image files; got a "
                                        r"folder '.*class02/nested'\. Move it out of the tree or delete it"):
        load_image_folder(flat)
    (flat / "class02" / "nested" / "a.png").unlink()
    (flat / "class02" / "nested").rmdir()
    (flat / "class02" / ".thumbnails").mkdir()  # hidden entries are skipped
    assert load_image_folder(flat).n_images == 6

    grouped = write_image_tree(tmp_path / "grouped", n_classes=4, per_class=2, groups=2)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(grouped / "group1" / "stray.png")
    with pytest.raises(DataError, match=r"group 'group1' must hold only class folders; got image file "
                                        r"'.*group1/stray\.png'\. Move it into a class folder"):
        load_image_folder(grouped)
    (grouped / "group1" / "stray.png").unlink()
    (grouped / "group0" / "class00" / "deeper").mkdir()
    with pytest.raises(DataError, match=r"class folder 'group0/class00' must hold only image files; got a folder "
                                        r"'.*group0/class00/deeper'"):
        load_image_folder(grouped)
    (grouped / "group0" / "class00" / "deeper").rmdir()
    assert load_image_folder(grouped).group_names == ("group0", "group1")
