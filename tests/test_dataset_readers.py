"""The benchmark readers (miniImageNet, tieredImageNet, CIFAR-FS/FC100, CUB) on small generated
copies in each published layout, the restricted unpickler, and the checksum-verified downloads
against a local HTTP server."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metafit import DataError, DownloadError
from metafit.data import DATASETS, data_config
from metafit.data import cifar as cifar_mod
from metafit.data import cub as cub_mod
from metafit.data.safe_pickle import load_pickle
from metafit.data.split_files import published_split

SPLITS = ("train", "val", "test")
MINI = published_split("miniimagenet")["splits"]
TIERED = published_split("tieredimagenet")
CUB = published_split("cub")["splits"]
FC100 = published_split("fc100")
CIFARFS = published_split("cifarfs")["splits"]
FAST = {"workers": 0, "storage": "memory"}


def _pixels(seed: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, seed: int, h: int = 12, w: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed, h, w)).save(path)


def _all_images(data) -> torch.Tensor:
    return data.fetch(data.image_indices())


def _counts(splits) -> dict[str, int]:
    return {s: splits[s].n_classes for s in SPLITS}


def _same_images(a, b) -> None:
    for s in SPLITS:
        assert a[s].class_names == b[s].class_names
        assert torch.equal(_all_images(a[s]), _all_images(b[s]))


def _same_image_sets(a, b) -> None:
    """The same classes with the same images, in any order within a class."""
    for s in SPLITS:
        assert a[s].class_names == b[s].class_names and torch.equal(a[s].class_count, b[s].class_count)
        for k in range(a[s].n_classes):
            idx = [torch.arange(d[s].class_start[k], d[s].class_start[k] + d[s].class_count[k]) for d in (a, b)]
            sets = [sorted(x.numpy().tobytes() for x in d[s].fetch(i)) for d, i in zip((a, b), idx)]
            assert sets[0] == sets[1]


def test_registry_defaults():
    expected = {"miniimagenet": 84, "tieredimagenet": 84, "cifar_fs": 32, "fc100": 32, "cub": 84}
    for name, size in expected.items():
        cfg = data_config({"name": name})
        assert type(cfg) is DATASETS[name] and cfg.summary and cfg.image_size == size
        assert cfg.normalize == "dataset" and cfg.in_channels == 3 and cfg.root is None
    assert data_config({"name": "miniimagenet"}).fit == "crop"
    assert data_config({"name": "cub"}).download is False and data_config({"name": "fc100"}).download is False


# -- safe pickle --------------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2 byte strings, like CIFAR-100's python batches and
    Ren et al.'s tieredImageNet pickles, with numpy 1's module names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2str
    dispatch[bytes] = save_py2str


def py2_dumps(obj) -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_safe_pickle_reads_arrays_and_containers_at_every_protocol():
    obj = {"a": np.arange(12, dtype=np.uint8).reshape(3, 4), "s": np.float32(3.5), "d": np.dtype("int16"),
           "o": OrderedDict(x=[1, 2]), "set": {1, 2}, "b": b"xyz", "objects": np.array([b"ab", "c", 3], dtype=object)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        got = load_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
        assert np.array_equal(got["a"], obj["a"]) and got["a"].dtype == np.uint8
        assert got["s"] == np.float32(3.5) and got["d"] == np.dtype("int16") and got["o"] == obj["o"]
        assert got["set"] == {1, 2} and got["b"] == b"xyz" and list(got["objects"]) == [b"ab", "c", 3]


def test_safe_pickle_reads_python2_pickles(tmp_path):
    obj = {"data": np.arange(24, dtype=np.uint8).reshape(2, 12), "fine_labels": [1, 2], "names": {"x"},
           "batch_label": "training batch 1 of 1"}
    blob = py2_dumps(obj)
    assert b"numpy.core.multiarray" in blob and b"__builtin__" in blob  # as written by Python 2 / numpy 1
    (tmp_path / "batch").write_bytes(blob)
    got = load_pickle(tmp_path / "batch")
    assert np.array_equal(got["data"], obj["data"]) and got["names"] == {"x"}
    assert got["batch_label"] == "training batch 1 of 1"
    as_bytes = load_pickle(tmp_path / "batch", encoding="bytes")
    assert set(as_bytes) == {b"data", b"fine_labels", b"names", b"batch_label"}


def test_safe_pickle_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"image_data": _RunsShell(f"touch {marker}")}))
    with pytest.raises(DataError) as err:
        load_pickle(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "system" in msg
    assert "must hold only arrays and plain containers" in msg and "Use the dataset's published files" in msg
    # the classic hand-written form names os.system itself
    crafted = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(DataError, match=r"got a reference to 'os\.system'"):
        load_pickle(io.BytesIO(crafted), where="'crafted.pkl'")
    for module, name in (("builtins", "eval"), ("builtins", "getattr"), ("__builtin__", "exec"),
                         ("copyreg", "_reconstructor"), ("numpy", "load"), ("subprocess", "Popen")):
        blob = f"c{module}\n{name}\n(S'1'\ntR.".encode()
        with pytest.raises(DataError, match="must hold only arrays"):
            load_pickle(io.BytesIO(blob))
    assert not marker.exists()
    with pytest.raises(DataError, match=r"must be a complete, readable pickle; got an unreadable file"):
        load_pickle(io.BytesIO(pickle.dumps(np.arange(100))[:40]))


# -- miniImageNet ---------------------------------------------------------------------------------
def _mini_classes():
    return [(s, c) for s in SPLITS for c in MINI[s]]


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    """All three image-file layouts side by side: csv/, split/ and tree/ (2 images per class)."""
    base = tmp_path_factory.mktemp("mini")
    for n, (s, c) in enumerate(_mini_classes()):
        rows = []
        for i in range(2):
            seed = 10 * n + i
            name = f"{c}{i + 1:08d}.jpg"
            _save(base / "csv" / "images" / name, seed)
            _save(base / "split" / s / c / name, seed)
            _save(base / "tree" / "images" / c / name, seed)
            rows.append((name, c))
        with open(base / "csv" / f"{s}.csv", "a", newline="") as f:
            w = csv.writer(f)
            if f.tell() == 0:
                w.writerow(["filename", "label"])
            w.writerows(rows)
    _save(base / "tree" / "images" / "n99999999" / "extra.jpg", 0)  # a class outside the split: left out
    return base


def _mini(root: Path, **kw):
    return data_config({"name": "miniimagenet", "root": str(root), "image_size": 16, **FAST, **kw}).load_splits()


def test_miniimagenet_image_layouts(mini_root):
    csv_splits = _mini(mini_root / "csv")
    assert _counts(csv_splits) == {"train": 64, "val": 16, "test": 20}
    assert csv_splits["train"].class_names == tuple(MINI["train"])
    assert csv_splits["train"].image_shape == (3, 16, 16) and csv_splits["test"].n_images == 40
    assert not csv_splits["train"].lazy and csv_splits["train"].group_names == ("",)
    for layout in ("split", "tree"):
        _same_images(csv_splits, _mini(mini_root / layout))
    _same_images(csv_splits, _mini(mini_root / "split", storage="lazy"))
    assert _mini(mini_root / "tree", storage="lazy")["val"].lazy
    # a csv file given as root stands for its folder; the registry has the name
    assert _counts(_mini(mini_root / "csv" / "val.csv")) == _counts(csv_splits)
    assert DATASETS["miniimagenet"].__name__ == "MiniImageNetConfig"


def test_miniimagenet_layout_errors(mini_root, tmp_path, monkeypatch):
    monkeypatch.delenv("METAFIT_MINIIMAGENET", raising=False)
    with pytest.raises(DataError, match=r"MiniImageNet: data.root must point at the dataset \(mini-imagenet-cache"):
        data_config({"name": "miniimagenet"}).load_splits()
    with pytest.raises(DataError, match="must be an existing folder or file .*train.csv"):
        _mini(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"must hold miniImageNet as mini-imagenet-cache-\{train,val,test\}.pkl; "
                                        r"images/<wnid><8 digits>.jpg with train.csv"):
        _mini(tmp_path / "empty")
    # a csv file missing
    part = tmp_path / "part"
    shutil.copytree(mini_root / "csv", part)
    (part / "test.csv").unlink()
    with pytest.raises(DataError) as err:
        _mini(part)
    assert "test.csv' must exist (Ravi & Larochelle's layout" in str(err.value) and "\n" not in str(err.value)
    # images without the csv files
    for s in SPLITS[:2]:
        (part / f"{s}.csv").unlink()
    with pytest.raises(DataError, match=r"must hold train.csv, val.csv and test.csv beside images/"):
        _mini(part)
    # an image the csv lists is missing
    shutil.rmtree(part)
    shutil.copytree(mini_root / "csv", part)
    gone = f"{MINI['val'][0]}00000002.jpg"
    (part / "images" / gone).unlink()
    with pytest.raises(DataError, match=rf"{gone}' \(listed in val.csv\) must exist"):
        _mini(part)
    # a class folder in the wrong split, and one missing
    moved = tmp_path / "moved"
    shutil.copytree(mini_root / "split", moved)
    c = MINI["train"][0]
    (moved / "train" / c).rename(moved / "val" / c)
    with pytest.raises(DataError, match=rf"class {c} must be in train as in the published split \(.*\); got it in val"):
        _mini(moved)
    shutil.rmtree(moved / "val" / c)
    with pytest.raises(DataError, match=rf"must hold every class of the published split .*got 1 missing: {c}"):
        _mini(moved)
    shutil.rmtree(moved / "test")
    with pytest.raises(DataError, match=r"test' must be a folder of class folders \(train/, val/ and test/"):
        _mini(moved)


@pytest.fixture(scope="module")
def mini_pickles(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mini-pkl")
    for s in SPLITS:
        classes = MINI[s]
        images = np.stack([_pixels(1000 + i) for i in range(2 * len(classes))])
        order = np.random.default_rng(0).permutation(len(images))  # a class's images need not be adjacent
        class_dict = {c: order[2 * k:2 * k + 2].tolist() for k, c in enumerate(classes)}
        with open(folder / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
    return folder


def test_miniimagenet_pickle_layout(mini_pickles):
    splits = _mini(mini_pickles, image_size=12)
    assert _counts(splits) == {"train": 64, "val": 16, "test": 20}
    with open(mini_pickles / "mini-imagenet-cache-val.pkl", "rb") as f:
        raw = pickle.load(f)
    c = MINI["val"][3]
    val = splits["val"]
    k = val.class_names.index(c)
    got = val.fetch(torch.arange(val.class_start[k], val.class_start[k] + 2))
    want = torch.from_numpy(raw["image_data"][raw["class_dict"][c]]).permute(0, 3, 1, 2)
    assert torch.equal(got, want)
    assert _mini(mini_pickles, image_size=8, storage="auto")["test"].image_shape == (3, 8, 8)  # resized, cached
    with pytest.raises(DataError, match=r"data.storage must be 'memory' or 'auto' for the pickle layout"):
        _mini(mini_pickles, storage="lazy")


def test_miniimagenet_pickle_errors(mini_pickles, tmp_path):
    folder = tmp_path / "pkl"
    shutil.copytree(mini_pickles, folder)
    (folder / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError, match=r"mini-imagenet-cache-test.pkl' must exist \(the pickle layout"):
        _mini(folder)
    with open(folder / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"images": np.zeros((1, 12, 12, 3), np.uint8)}, f)
    with pytest.raises(DataError, match=r"must hold a dict with 'image_data' and 'class_dict'"):
        _mini(folder)
    marker = tmp_path / "pwned"
    with open(folder / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": _RunsShell(f"touch {marker}"), "class_dict": {}}, f)
    with pytest.raises(DataError, match=r"mini-imagenet-cache-test.pkl' must hold only arrays"):
        _mini(folder)
    assert not marker.exists()


# -- tieredImageNet -------------------------------------------------------------------------------
def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(seed, 8, 8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiered_root(tmp_path_factory) -> Path:
    """Both layouts: folders/ (train/<wnid>/...) and pickles/ (Ren et al.'s), 2 images per class."""
    base = tmp_path_factory.mktemp("tiered")
    categories = TIERED["categories"]
    for s in SPLITS:
        classes = list(TIERED["splits"][s])[::-1]  # label order of the pickles differs from the split file's
        cats = sorted({categories[c] for c in classes})
        specific, general, items = [], [], []
        for k, c in enumerate(classes):
            for i in range(2):
                seed = zlib.crc32(f'{c}/{i}'.encode())
                blob = _png_bytes(seed)
                (base / "folders" / s / c).mkdir(parents=True, exist_ok=True)
                (base / "folders" / s / c / f"{c}_{i}.png").write_bytes(blob)
                # some as cv2.imencode returns them (uint8 [n, 1]), some as bytes
                items.append(np.frombuffer(blob, np.uint8).reshape(-1, 1) if i else blob)
                specific.append(k)
                general.append(cats.index(categories[c]))
        perm = np.random.default_rng(1).permutation(len(items))
        (base / "pickles").mkdir(exist_ok=True)
        with open(base / "pickles" / f"{s}_images_png.pkl", "wb") as f:
            pickle.dump([items[i] for i in perm], f, protocol=2)
        labels = {b"label_specific": np.array(specific)[perm], b"label_general": np.array(general)[perm],
                  b"label_specific_str": classes, b"label_general_str": cats}
        # Python 2's pickles (keys read as str), and one written with bytes keys and labels
        blob = pickle.dumps({k: [c.encode() for c in v] if k.endswith(b"_str") else v for k, v in labels.items()},
                            protocol=4) if s == "val" else py2_dumps(labels)
        (base / "pickles" / f"{s}_labels.pkl").write_bytes(blob)
    return base


def _tiered(root: Path, **kw):
    return data_config({"name": "tieredimagenet", "root": str(root), "image_size": 8, **FAST, **kw}).load_splits()


def test_tieredimagenet_layouts_and_groups(tiered_root):
    folders = _tiered(tiered_root / "folders")
    assert _counts(folders) == {"train": 351, "val": 97, "test": 160}
    assert folders["train"].image_shape == (3, 8, 8) and folders["val"].n_images == 2 * 97
    assert {s: len(folders[s].group_names) for s in SPLITS} == {"train": 20, "val": 6, "test": 8}
    categories = TIERED["categories"]
    for s in SPLITS:
        d = folders[s]
        assert [d.group_names[g] for g in d.class_group.tolist()] == [categories[c] for c in d.class_names]
    _same_images(folders, _tiered(tiered_root / "folders", storage="lazy"))
    pickles = _tiered(tiered_root / "pickles")
    _same_image_sets(folders, pickles)  # PNG is lossless: the same pixels from both layouts
    for s in SPLITS:
        assert pickles[s].group_names == folders[s].group_names
        assert torch.equal(pickles[s].class_group, folders[s].class_group)
    first, start = pickles["train"].class_names[0], int(pickles["train"].class_start[0])
    want = {_pixels(zlib.crc32(f"{first}/{i}".encode()), 8, 8).transpose(2, 0, 1).tobytes() for i in range(2)}
    assert {x.numpy().tobytes() for x in pickles["train"].fetch(torch.arange(start, start + 2))} == want


def test_tieredimagenet_errors(tiered_root, tmp_path):
    with pytest.raises(DataError, match=r"data.storage must be 'memory' or 'auto' for Ren et al.'s pickle layout"):
        _tiered(tiered_root / "pickles", storage="lazy")
    part = tmp_path / "pickles"
    shutil.copytree(tiered_root / "pickles", part)
    (part / "val_labels.pkl").unlink()
    with pytest.raises(DataError) as err:
        _tiered(part)
    assert "val_labels.pkl' must exist (Ren et al.'s layout is {train,val,test}_images_png.pkl" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"must hold tieredImageNet as Ren et al.'s \{train,val,test\}_images_png"):
        _tiered(tmp_path / "empty")
    moved = tmp_path / "folders"
    shutil.copytree(tiered_root / "folders" / "val", moved / "val")
    shutil.copytree(tiered_root / "folders" / "test", moved / "test")
    (moved / "train").mkdir()
    c = TIERED["splits"]["test"][0]
    (moved / "test" / c).rename(moved / "train" / c)
    with pytest.raises(DataError, match=rf"class {c} must be in test as in the published split"):
        _tiered(moved)


# -- CIFAR-FS / FC100 -----------------------------------------------------------------------------
def _cifar_parts():
    fine, coarse_of = [], {}
    for s in SPLITS:
        for k, sc in enumerate(FC100["superclasses"][s]):
            for c in FC100["splits"][s][5 * k:5 * k + 5]:
                coarse_of[c] = sc
    fine = sorted(coarse_of)
    coarse = sorted(set(coarse_of.values()))
    parts = {"meta": {"fine_label_names": fine, "coarse_label_names": coarse}}
    rng = np.random.default_rng(5)
    for p, per in (("train", 2), ("test", 1)):
        labels = rng.permutation(np.repeat(np.arange(100), per)).tolist()
        parts[p] = {"batch_label": f"{p} batch", "filenames": [f"x{i}.png" for i in range(len(labels))],
                    "fine_labels": labels, "coarse_labels": [coarse.index(coarse_of[fine[f]]) for f in labels],
                    "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}
    return parts


def _cifar_tar(path: Path, parts: dict, top: str = "cifar-100-python") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in parts.items():
            blob = obj if isinstance(obj, bytes) else py2_dumps(obj)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """``cifar-100-python.tar.gz`` and the extracted ``cifar-100-python/``: 2 training and 1 test
    image per class, written as Python 2 pickles."""
    base = tmp_path_factory.mktemp("cifar")
    parts = _cifar_parts()
    (base / "archive").mkdir()
    _cifar_tar(base / "archive" / "cifar-100-python.tar.gz", parts)
    folder = base / "extracted" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, obj in parts.items():
        (folder / name).write_bytes(py2_dumps(obj))
    return base


def _cifar(name: str, root, **kw):
    return data_config({"name": name, "root": str(root) if root else None, **kw}).load_splits()


def test_cifar_fs_and_fc100(cifar_root):
    parts = _cifar_parts()
    archive = cifar_root / "archive" / "cifar-100-python.tar.gz"
    fs = _cifar("cifar_fs", archive)
    assert _counts(fs) == {"train": 64, "val": 16, "test": 20}
    assert fs["train"].class_names == tuple(CIFARFS["train"])
    assert fs["train"].image_shape == (3, 32, 32) and set(fs["val"].class_count.tolist()) == {3}
    # a class's images: its training images, then its test image
    c = "dolphin"
    k = fs["train"].class_names.index(c)
    label = parts["meta"]["fine_label_names"].index(c)
    want = np.concatenate([parts[p]["data"][np.array(parts[p]["fine_labels"]) == label] for p in ("train", "test")])
    got = fs["train"].fetch(torch.arange(fs["train"].class_start[k], fs["train"].class_start[k] + 3))
    assert torch.equal(got, torch.from_numpy(want.reshape(-1, 3, 32, 32)))
    assert fs["train"].group_names[fs["train"].class_group[k]] == "aquatic_mammals"
    _same_images(fs, _cifar("cifar_fs", cifar_root / "extracted"))  # the folder holding cifar-100-python/
    fc = _cifar("fc100", cifar_root / "extracted" / "cifar-100-python")
    assert _counts(fc) == {"train": 60, "val": 20, "test": 20}
    for s in SPLITS:
        assert list(fc[s].group_names) == sorted(FC100["superclasses"][s])
        assert fc[s].class_count.sum() == 3 * fc[s].n_classes
    small = _cifar("fc100", cifar_root / "archive", image_size=16)  # the folder holding the archive
    assert small["test"].image_shape == (3, 16, 16)


def test_cifar_errors(cifar_root, tmp_path, monkeypatch):
    monkeypatch.delenv("METAFIT_CIFAR100", raising=False)
    with pytest.raises(DataError, match=r"CIFAR-100: data.root must point at the dataset \(CIFAR-100's python "
                                        r"version: cifar-100-python.tar.gz"):
        _cifar("cifar_fs", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"must hold CIFAR-100's python version: cifar-100-python.tar.gz, or the "
                                        r"extracted cifar-100-python/ folder .*got neither"):
        _cifar("fc100", tmp_path / "empty")
    part = tmp_path / "part" / "cifar-100-python"
    shutil.copytree(cifar_root / "extracted" / "cifar-100-python", part)
    (part / "meta").unlink()
    with pytest.raises(DataError, match=r"cifar-100-python/meta' must exist"):
        _cifar("cifar_fs", part.parent)
    parts = _cifar_parts()
    del parts["test"]
    with pytest.raises(DataError, match=r"must hold cifar-100-python/train, cifar-100-python/test and "
                                        r"cifar-100-python/meta .*got no cifar-100-python/test"):
        _cifar("cifar_fs", _cifar_tar(tmp_path / "short.tar.gz", parts))
    marker = tmp_path / "pwned"
    parts = _cifar_parts()
    parts["meta"] = pickle.dumps(_RunsShell(f"touch {marker}"), protocol=2)
    with pytest.raises(DataError, match=r"evil.tar.gz:cifar-100-python/meta' must hold only arrays and plain "
                                        r"containers; got a reference to '(os|posix).system'"):
        _cifar("cifar_fs", _cifar_tar(tmp_path / "evil.tar.gz", parts))
    assert not marker.exists()


def test_cifar_download(server, cifar_root, tmp_path, monkeypatch):
    www, url = server
    blob = shutil.copy(cifar_root / "archive" / "cifar-100-python.tar.gz", www / "cifar-100-python.tar.gz")
    md5 = hashlib.md5(Path(blob).read_bytes()).hexdigest()
    monkeypatch.delenv("METAFIT_CIFAR100", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setattr(cifar_mod, "CIFAR100_URL", (url + "cifar-100-python.tar.gz", "md5:" + "0" * 32))
    with pytest.raises(DownloadError, match="checksum .* must be 0000.*nothing was kept"):
        _cifar("cifar_fs", None, download=True, cache_dir=str(cache))
    assert not (cache / "cifar100" / "cifar-100-python.tar.gz").exists()
    monkeypatch.setattr(cifar_mod, "CIFAR100_URL", (url + "cifar-100-python.tar.gz", f"md5:{md5}"))
    got = _cifar("cifar_fs", None, download=True, cache_dir=str(cache))
    assert _counts(got) == {"train": 64, "val": 16, "test": 20}
    assert (cache / "cifar100" / "cifar-100-python.tar.gz").read_bytes() == Path(blob).read_bytes()


def test_published_download_addresses():
    assert cifar_mod.CIFAR100_URL == ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                      "md5:eb9058c3a382ffc7106e4002c42a8d85")
    assert cub_mod.CUB_URL == ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                               "md5:97eceeb196236b17998738112f37df78")


# -- CUB ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    """``CUB_200_2011/images/<NNN.Name>/*.jpg`` (2 non-square images per class) and its tgz."""
    base = tmp_path_factory.mktemp("cub")
    classes = sorted(c for s in SPLITS for c in CUB[s])
    for n, c in enumerate(classes):
        for i in range(2):
            _save(base / "tree" / "CUB_200_2011" / "images" / c / f"{c.split('.')[1]}_{i:04d}.jpg", 7 * n + i, 10, 14)
    (base / "tree" / "CUB_200_2011" / "classes.txt").write_text("\n".join(classes))
    with tarfile.open(base / "CUB_200_2011.tgz", "w:gz") as tf:
        tf.add(base / "tree" / "CUB_200_2011", arcname="CUB_200_2011")
        info = tarfile.TarInfo("attributes.txt")  # outside the image tree: not extracted
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return base


def _cub(root, **kw):
    cfg = {"name": "cub", "root": str(root) if root else None, "image_size": 12, **FAST, **kw}
    return data_config(cfg).load_splits()


def test_cub_layouts(cub_root, tmp_path):
    splits = _cub(cub_root / "tree")
    assert _counts(splits) == {"train": 100, "val": 50, "test": 50}
    assert splits["train"].class_names == tuple(CUB["train"]) and splits["train"].image_shape == (3, 12, 12)
    assert set(splits["test"].class_count.tolist()) == {2}
    _same_images(splits, _cub(cub_root / "tree" / "CUB_200_2011"))
    _same_images(splits, _cub(cub_root / "tree", storage="lazy"))
    cache = tmp_path / "cache"
    from_archive = _cub(cub_root / "CUB_200_2011.tgz", storage="lazy", cache_dir=str(cache))
    _same_images(splits, from_archive)
    extracted = list((cache / "cub").iterdir())
    assert len(extracted) == 1 and extracted[0].name.startswith("CUB_200_2011-")
    assert not (extracted[0] / "attributes.txt").exists()  # only the image members are extracted
    assert not (extracted[0] / "CUB_200_2011" / "classes.txt").exists()
    _same_images(splits, _cub(cub_root / "CUB_200_2011.tgz", cache_dir=str(cache)))  # extracted once, reused
    assert list((cache / "cub").iterdir()) == extracted


def test_cub_errors_and_download(cub_root, server, tmp_path, monkeypatch):
    monkeypatch.delenv("METAFIT_CUB", raising=False)
    with pytest.raises(DataError, match=r"CUB: data.root must point at the dataset \(CUB_200_2011/images/<NNN.Name>"):
        _cub(None)
    misplaced = tmp_path / "misplaced"
    shutil.copytree(cub_root / "tree" / "CUB_200_2011" / "images", misplaced / "CUB_200_2011")  # no images/ level
    with pytest.raises(DataError) as err:
        _cub(misplaced)
    msg = str(err.value)
    assert "\n" not in msg and "must hold CUB_200_2011/images/<NNN.Name>/<image>.jpg" in msg and "got neither" in msg
    shutil.rmtree(misplaced / "CUB_200_2011" / CUB["val"][1])
    with pytest.raises(DataError, match=rf"got 1 missing: {CUB['val'][1]}"):
        _cub(misplaced / "CUB_200_2011")
    www, url = server
    shutil.copy(cub_root / "CUB_200_2011.tgz", www / "CUB_200_2011.tgz")
    md5 = hashlib.md5((www / "CUB_200_2011.tgz").read_bytes()).hexdigest()
    monkeypatch.setattr(cub_mod, "CUB_URL", (url + "CUB_200_2011.tgz", f"md5:{md5}"))
    cache = tmp_path / "cache"
    got = _cub(None, download=True, cache_dir=str(cache))
    assert _counts(got) == {"train": 100, "val": 50, "test": 50}
    assert (cache / "cub" / "CUB_200_2011.tgz").is_file()
