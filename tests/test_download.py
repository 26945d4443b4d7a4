"""Checksum-verified download, served by a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import pytest

from metafit import DownloadError
from metafit.data import download_file
from metafit.data import omniglot as omni
from test_omniglot import make_zip


def test_download_verifies_checksum(server, tmp_path):
    root, url = server
    blob = make_zip(root / "images_background.zip")
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "images_background.zip"
    assert download_file(url + "images_background.zip", dest, f"sha256:{digest}") == dest
    assert dest.read_bytes() == blob.read_bytes()
    md5 = hashlib.md5(blob.read_bytes()).hexdigest()
    assert download_file(url + "images_background.zip", dest, f"md5:{md5}") == dest  # already there


def test_wrong_checksum_fails_loudly_and_leaves_nothing(server, tmp_path):
    root, url = server
    make_zip(root / "images_background.zip")
    dest = tmp_path / "cache" / "images_background.zip"
    with pytest.raises(DownloadError, match="checksum .* must be 0000.*nothing was kept"):
        download_file(url + "images_background.zip", dest, "sha256:" + "0" * 64)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no partial file either


def test_existing_file_with_wrong_checksum_is_replaced(server, tmp_path):
    root, url = server
    blob = make_zip(root / "images_background.zip")
    dest = tmp_path / "images_background.zip"
    dest.write_bytes(b"stale")
    download_file(url + "images_background.zip", dest, "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest())
    assert dest.read_bytes() == blob.read_bytes()


def test_unreachable_url_names_the_fix(tmp_path, server):
    _, url = server
    with pytest.raises(DownloadError, match="could not be fetched.*place it at"):
        download_file(url + "missing.zip", tmp_path / "x.zip", "md5:" + "0" * 32)
    assert not (tmp_path / "x.zip").exists()
    with pytest.raises(DownloadError, match="checksum must be"):
        download_file(url + "missing.zip", tmp_path / "x.zip", "crc:1")


def test_omniglot_download_path_end_to_end(server, tmp_path, monkeypatch):
    root, url = server
    blob = make_zip(root / "images_background.zip")
    monkeypatch.setattr(omni, "BASE_URL", url)
    monkeypatch.setitem(omni.OMNIGLOT_FILES, "background",
                        ("images_background.zip", "md5:" + hashlib.md5(blob.read_bytes()).hexdigest()))
    monkeypatch.delenv("METAFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("METAFIT_CACHE_DIR", str(tmp_path / "cache"))
    data = omni.load_omniglot("background", download=True)
    assert data.n_classes == 6
    assert (tmp_path / "cache" / "omniglot" / "images_background.zip").is_file()
    # a tampered upstream file is refused
    monkeypatch.setitem(omni.OMNIGLOT_FILES, "evaluation", ("images_evaluation.zip", "md5:" + "1" * 32))
    make_zip(root / "images_evaluation.zip", split="images_evaluation")
    with pytest.raises(DownloadError):
        omni.load_omniglot("evaluation", download=True)
    assert not (tmp_path / "cache" / "omniglot" / "images_evaluation.zip").exists()
