"""Hostile images against every way in: the folder data source (training data), ``metafit
adapt``/``predict``, the Python API and the service. One reader, one pixel limit, one message;
truncated and corrupt files, odd folder trees and palette images."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import metafit
from conftest import tiny_config, write_image_tree
from metafit import DataError
from metafit.cli.main import main
from metafit.data import DataConfig, list_images, load_image_folder, load_splits
from metafit.data.decode import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, max_image_pixels, open_image
from metafit.errors import ConfigError
from metafit.training import build_model, make_config, save_checkpoint


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit black PNG of width x height (400 Mpx by default) that is ~50 KB on disk."""
    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png()
    assert len(data) < 100_000
    with pytest.raises(Image.DecompressionBombError):  # what Pillow alone does with it
        Image.open(io.BytesIO(data))
    return data


def _png_bytes(size=(20, 20), mode="L", value=128) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, "PNG")
    return buf.getvalue()


def _truncated() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _corrupt() -> bytes:
    """A PNG whose header is intact and whose compressed pixels are garbage."""
    rng = np.random.default_rng(1)
    ihdr = struct.pack(">IIBBBBB", 32, 32, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rng.bytes(300))
            + _chunk(b"IEND", b""))


HOSTILE = {"truncated.png": _truncated, "corrupt.png": _corrupt, "notanimage.png": lambda: b"GIF89a but not really",
           "empty.png": lambda: b""}


def _one_line(text: str) -> str:
    assert "\n" not in text.strip() and " at 0x" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile-ckpt")
    cfg = make_config(tiny_config(tmp / "run", algorithm={"name": "protonet"}))
    torch.manual_seed(0)
    return save_checkpoint(tmp / "protonet.safetensors", build_model(cfg), cfg, step=1)


def _support(root: Path, n_classes: int = 3) -> Path:
    return write_image_tree(root, n_classes=n_classes, per_class=2, size=20)


# -- decompression bombs ----------------------------------------------------------------------

def test_bomb_in_the_folder_data_source_is_refused_naming_it(tmp_path, bomb):
    root = write_image_tree(tmp_path / "data", n_classes=20, per_class=2, size=20)
    (root / "class07" / "bomb.png").write_bytes(bomb)
    pattern = (rf"^Images: '{root}/class07/bomb\.png' must have at most {DEFAULT_MAX_IMAGE_PIXELS} pixels \(width x "
               r"height\); got (20000x20000 = )?400000000 pixels\. Downscale it, or raise the limit")
    with pytest.raises(ImageTooLargeError, match=pattern) as err:  # channels inferred from the headers
        load_image_folder(root)
    _one_line(str(err.value))
    with pytest.raises(DataError, match=pattern):  # channels given: the decoding pass (worker processes) refuses it
        load_image_folder(root, channels=1)
    with pytest.raises(DataError, match=pattern):  # training data loading, as `metafit train` does it
        load_splits(DataConfig(name="folder", root=str(root), val_fraction=0.2, test_fraction=0.2))
    lazy = load_image_folder(root, channels=1, storage="lazy")  # decoded on demand: refused when read
    i = [lazy.images.name(j) for j in range(len(lazy.images))].index(str(root / "class07" / "bomb.png"))
    with pytest.raises(ImageTooLargeError, match=pattern):
        lazy.images.read(i)
    assert lazy.images.read(0).shape == (1, 28, 28)


def test_bomb_in_training_through_the_cli_is_one_line(tmp_path, bomb, capsys):
    root = write_image_tree(tmp_path / "data", n_classes=12, per_class=3, size=16)
    (root / "class03" / "bomb.png").write_bytes(bomb)
    cfg = tiny_config(tmp_path / "run", data={"root": str(root), "val_fraction": 0.25, "test_fraction": 0.25})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Images: ") and err.count("\n") == 1 and "bomb.png' must have at most" in err


def test_bomb_against_adapt_and_predict_on_the_command_line(tmp_path, bomb, checkpoint, capsys):
    support = _support(tmp_path / "support")
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "fine.png").write_bytes(_png_bytes())
    (queries / "bomb.png").write_bytes(bomb)
    task = tmp_path / "task.safetensors"
    assert main(["adapt", str(checkpoint), "--support", str(support), "--out", str(task)]) == 0
    capsys.readouterr()
    assert main(["predict", str(task), "--images", str(queries)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Images: ") and "bomb.png' must have at most" in lines[0]
    _one_line(lines[0])

    (support / "class01" / "bomb.png").write_bytes(bomb)
    for argv in (["adapt", str(checkpoint), "--support", str(support), "--out", str(tmp_path / "t2.safetensors")],
                 ["predict", str(checkpoint), "--support", str(support), "--images", str(queries / "fine.png")]):
        assert main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: Images: ") and "400000000 pixels" in lines[0], lines
    assert not (tmp_path / "t2.safetensors").exists()


def test_bomb_against_the_python_api(tmp_path, bomb, checkpoint, monkeypatch):
    support = _support(tmp_path / "support")
    files = sorted(support.rglob("*.png"))
    labels = [f.parent.name for f in files]
    bomb_file = tmp_path / "bomb.png"
    bomb_file.write_bytes(bomb)
    model = metafit.load(checkpoint)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png' must have at most \d+ pixels"):
        model.adapt(files + [bomb_file], labels + ["class00"])
    task = model.adapt(files, labels)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png' must have at most"):
        task.predict([files[0], bomb_file])
    assert len(task.predict(files).labels) == len(files)
    # PIL images handed in are held to the same limit before they are decoded
    monkeypatch.setenv("METAFIT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageTooLargeError, match="image 1 must have at most 1000 pixels.*got 40x40 = 1600"):
        task.predict([Image.new("L", (20, 20)), Image.new("L", (40, 40))])
    with pytest.raises(ImageTooLargeError, match="must have at most 1000 pixels"):
        task.predict([Image.open(io.BytesIO(_png_bytes((40, 40))))])  # lazily opened: refused before load
    assert len(task.predict([Image.new("L", (20, 20))]).labels) == 1


def test_the_limit_is_one_setting(tmp_path, monkeypatch):
    f = tmp_path / "a.png"
    f.write_bytes(_png_bytes((40, 40)))
    monkeypatch.delenv("METAFIT_MAX_IMAGE_PIXELS", raising=False)
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS
    monkeypatch.setenv("METAFIT_MAX_IMAGE_PIXELS", "1599")
    with pytest.raises(ImageTooLargeError, match="must have at most 1599 pixels .*got 40x40 = 1600 pixels.*"
                                                 "METAFIT_MAX_IMAGE_PIXELS"):
        metafit.data.read_image(f, 16, 1)
    monkeypatch.setenv("METAFIT_MAX_IMAGE_PIXELS", "1600")
    assert metafit.data.read_image(f, 16, 1).shape == (1, 16, 16)
    for bad in ("lots", "-5", "0"):
        monkeypatch.setenv("METAFIT_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ConfigError, match="METAFIT_MAX_IMAGE_PIXELS must be a positive whole number"):
            metafit.data.read_image(f, 16, 1)
    # metafit's limit is the one in force, even where Pillow's own guard is set stricter
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow alone refuses above 1000 pixels
    monkeypatch.setenv("METAFIT_MAX_IMAGE_PIXELS", "5000")
    assert metafit.data.read_image(f, 16, 1).shape == (1, 16, 16)
    with open_image(f, "a", max_pixels=1600) as im:  # an explicit limit (the service's) wins
        assert im.size == (40, 40)
    with pytest.raises(ImageTooLargeError, match="at most 100 pixels"), open_image(f, "a", max_pixels=100):
        pass


def test_bomb_against_the_service_is_413_json(tmp_path, bomb, checkpoint):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import serving

    support = _support(tmp_path / "support", n_classes=2)
    files = sorted(support.rglob("*.png"))
    up = [("images", (f.name, f.read_bytes(), "image/png")) for f in files]
    with serving(checkpoint) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/tasks", files=up + [("images", ("bomb.png", bomb, "image/png"))],
                   data={"labels": ["a", "a", "b", "b", "b"]})
        assert r.status_code == 413 and r.headers["content-type"] == "application/json"
        message = _one_line(r.json()["error"])
        assert message.startswith("Images: 'bomb.png' must have at most 16777216 pixels (width x height); got ")
        assert "400000000 pixels" in message and "Downscale it before sending it." in message
        task = c.post("/tasks", files=up, data={"labels": ["a", "a", "b", "b"]}).json()["task_id"]
        r = c.post(f"/tasks/{task}/predict", files=[("images", ("bomb.png", bomb, "image/png"))])
        assert r.status_code == 413 and "'bomb.png' must have at most" in r.json()["error"]
        for name, make in HOSTILE.items():
            r = c.post(f"/tasks/{task}/predict", files=up[:1] + [("images", (name, make(), "image/png"))])
            assert r.status_code == 400, (name, r.text)
            assert f"'{name}' must be a readable image" in _one_line(r.json()["error"]), r.text
        r = c.post(f"/tasks/{task}/predict", files=up)
        assert [p["label"] for p in r.json()["predictions"]] == ["a", "a", "b", "b"]


# -- truncated and corrupt files --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_truncated_and_corrupt_images_name_the_file(tmp_path, name, checkpoint):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    bad = root / "class01" / name
    bad.write_bytes(HOSTILE[name]())
    for channels in (None, 1):
        with pytest.raises(DataError, match=rf"'{bad}' must be a readable image.*Remove or replace") as err:
            load_image_folder(root, channels=channels)
        _one_line(str(err.value))
    with pytest.raises(DataError, match=rf"{name}' must be a readable image") as err:
        metafit.load(checkpoint).adapt([root / "class00" / "img00.png", bad], ["a", "b"])
    _one_line(str(err.value))


def test_truncated_pil_image_handed_to_the_api(checkpoint):
    im = Image.open(io.BytesIO(_truncated()))  # opens (the header is fine); decoding fails
    with pytest.raises(DataError, match="image 0 must be a readable image"):
        metafit.load(checkpoint).images([im])


# -- odd folder trees ---------------------------------------------------------------------------

def test_directory_named_like_an_image_in_a_class_folder(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    (root / "class01" / "img9.png").mkdir()
    with pytest.raises(DataError) as err:
        load_image_folder(root)
    message = _one_line(str(err.value))
    assert "class folder 'class01' must hold only image files; got a folder" in message
    assert "img9.png" in message and "group" not in message.split(";")[0]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_symlink_loops_in_a_folder_tree(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    (root / "class01" / "up").symlink_to("..")
    with pytest.raises(DataError, match=r"class folder 'class01' must hold only image files; got a symbolic link "
                                        r"to a folder '.*class01/up'") as err:
        load_image_folder(root)
    _one_line(str(err.value))
    os.remove(root / "class01" / "up")
    (root / "back").symlink_to(".")
    with pytest.raises(DataError, match=r"must not link back to a folder above them; got '.*back'"):
        load_image_folder(root)
    os.remove(root / "back")
    (root / "class02" / "loop.png").symlink_to("loop.png")  # a link to itself
    with pytest.raises(DataError, match=r"got '.*loop\.png', a symbolic link that leads nowhere"):
        load_image_folder(root)
    os.remove(root / "class02" / "loop.png")
    assert load_image_folder(root).n_images == 6
    grouped = write_image_tree(tmp_path / "grouped", n_classes=4, per_class=2, groups=2)
    (grouped / "group1" / "again").symlink_to("..")
    with pytest.raises(DataError, match=r"must not link back.*group1/again"):
        load_image_folder(grouped)
    # prediction inputs: a folder searched recursively does not follow the loop
    (root / "class00" / "up").symlink_to("..")
    assert len(list_images([root])) == 6


# -- palette images -----------------------------------------------------------------------------

def _gif(path: Path, rgb: bool) -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    im = Image.fromarray(arr, "L").convert("P")  # a palette of grays
    if rgb:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    im.save(path)
    assert Image.open(path).mode == "P"


def test_grayscale_palette_images_count_as_grayscale(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=3, per_class=2)
    _gif(root / "class01" / "gray.gif", rgb=False)
    # a palette PNG whose palette has colours, but whose pixels use only gray entries
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([255, 0, 0] + [60, 60, 60] + [0, 0, 255] * 254)
    pal.save(root / "class02" / "gray_entries.png")
    data = load_image_folder(root, image_size=16)
    assert data.images.shape == (8, 1, 16, 16)
    assert load_image_folder(root, image_size=16, storage="lazy").images.fmt.channels == 1
    _gif(root / "class02" / "colour.gif", rgb=True)
    with pytest.raises(DataError, match=r"must share one mode.*colour '.*colour\.gif'"):
        load_image_folder(root, image_size=16)


def test_bomb_and_corrupt_members_of_an_omniglot_archive(tmp_path, bomb):
    from test_omniglot import make_zip

    from metafit.data import load_omniglot

    for name, data, error, expected in [("bomb", bomb, ImageTooLargeError, "must have at most"),
                                        ("corrupt", _corrupt(), DataError, "must be a readable image")]:
        folder = tmp_path / name
        folder.mkdir()
        archive = make_zip(folder / "images_background.zip", chars=2, drawers=2)
        with zipfile.ZipFile(archive, "a") as z:
            z.writestr("images_background/Beta/character02/0002_09.png", data)
        with pytest.raises(error, match=rf"images_background\.zip:images_background/Beta/character02/0002_09\.png' "
                                        rf"{expected}") as err:
            load_omniglot("background", folder, image_size=16, cache=tmp_path / f"cache-{name}")
        _one_line(str(err.value))
