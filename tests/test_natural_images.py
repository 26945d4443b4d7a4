"""The natural-image pipeline: image conversion (modes, centre crop), lazy storage with worker
processes (same episodes as memory, exact resume, clean stops on bad files), batched seeded
augmentation, input normalisation carried by the model, and Tiny ImageNet's reader and split."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config, write_image_tree
from metafit import DataError
from metafit.data import (DATASETS, ClassBatchSampler, EpisodeSampler, ImageAugment, data_config,
                          load_image_folder, migrate_legacy_data)
from metafit.data.split_files import published_split
from metafit.data.decode import image_array
from metafit.data.store import ImageFormat
from metafit.training import Trainer, build_model, load, make_config, save_checkpoint


# -- conversion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "1"])
def test_every_image_mode_becomes_rgb(mode):
    im = Image.new("RGB", (10, 6), (200, 30, 90)).convert(mode)
    arr = image_array(im, 8, 3, fit="crop")
    assert arr.shape == (3, 8, 8) and arr.dtype == np.uint8


def test_transparent_pixels_are_composited_over_white():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (image_array(im, 4, 3) == 255).all()


def test_crop_keeps_the_aspect_and_upscales_small_images():
    im = Image.new("RGB", (30, 10), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 20, 10))  # a white centre square between black sides
    crop = image_array(im, 20, 3, fit="crop")  # upscaled 2x, the centre 10x10 -> 20x20
    assert crop.shape == (3, 20, 20) and crop.min() > 200
    squash = image_array(im, 20, 3, fit="squash")
    assert squash[:, :, 0].max() < 50  # the black side stays in a squashed image


# -- lazy storage -------------------------------------------------------------------------------
@pytest.fixture
def rgb_tree(tmp_path):
    return write_image_tree(tmp_path / "tree", n_classes=8, per_class=6, size=12, mode="RGB")


def test_lazy_and_memory_give_identical_episodes_and_resume_exactly(rgb_tree):
    mem = load_image_folder(rgb_tree, 12, 3, storage="memory")
    lazy = load_image_folder(rgb_tree, 12, 3, storage="lazy")
    assert not mem.lazy and lazy.lazy and torch.equal(lazy.fetch(torch.arange(mem.n_images)), mem.images)
    aug = ImageAugment(crop="random", crop_padding=2, flip=True, color_jitter=0.3)
    a = EpisodeSampler(mem, 3, 1, 2, augment=aug, seed=5)
    b = EpisodeSampler(lazy, 3, 1, 2, augment=aug, seed=5, workers=1)
    try:
        for _ in range(3):
            x, y = a.sample(2), b.sample(2)
            assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
        state = b.get_state()  # the workers have drawn ahead: the state is that of the next batch
        first = b.sample(2)
        b.set_state(state)
        again = b.sample(2)
        assert torch.equal(first.query_x, again.query_x) and torch.equal(first.query_x, a.sample(2).query_x)
    finally:
        b.close()


def test_lazy_class_batches_match_memory(rgb_tree):
    mem = load_image_folder(rgb_tree, 12, 3, storage="memory")
    lazy = load_image_folder(rgb_tree, 12, 3, storage="lazy")
    a, b = ClassBatchSampler(mem, seed=1), ClassBatchSampler(lazy, seed=1, workers=1)
    try:
        for _ in range(2):
            x, y = a.sample(7), b.sample(7)
            assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y)
    finally:
        b.close()


def test_unreadable_image_in_lazy_mode_is_named_and_stops_the_workers(rgb_tree):
    (rgb_tree / "class03" / "img09.png").write_bytes(b"not an image")
    data = load_image_folder(rgb_tree, 12, 3, storage="lazy")
    sampler = EpisodeSampler(data, 8, 1, 2, seed=0, workers=1)  # every class in every episode
    with pytest.raises(DataError, match=r"img09\.png' must be a readable image.*Remove or replace"):
        for _ in range(5):
            sampler.sample(2)
    assert sampler._pipeline is None  # workers stopped; nothing left running


def test_training_in_lazy_mode_matches_memory_and_resumes(rgb_tree, tmp_path):
    def run(storage, out, steps):
        cfg = make_config(tiny_config(out, data={"name": "folder", "root": str(rgb_tree), "image_size": 16,
                                                 "storage": storage, "workers": 1, "val_fraction": 0.25,
                                                 "test_fraction": 0.25},
                                      augment={"flip": True, "crop": "random", "crop_padding": 2},
                                      task={"n_ways": 2, "k_shots": 1, "n_queries": 2},
                                      eval={"n_ways": 2, "k_shots": 1, "n_queries": 2, "val_episodes": 4},
                                      train={"meta_steps": steps, "eval_every": 3, "save_interval": 3}))
        return Trainer(cfg)

    mem = run("memory", tmp_path / "mem", 6)
    mem.fit()
    lazy = run("lazy", tmp_path / "lazy", 3)
    lazy.fit()
    resumed = run("lazy", tmp_path / "lazy", 6)
    resumed.fit(resume=True)
    for (k, v), w in zip(mem.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    # the step breakdown reports augmentation apart from loading, and resume keeps counting both
    assert mem.timing["augment_s"] > 0 and mem.timing["data_s"] > 0
    assert resumed.timing["augment_s"] > lazy.timing["augment_s"] > 0


def test_auto_storage_follows_the_memory_budget(rgb_tree):
    small = data_config({"name": "folder", "root": str(rgb_tree), "image_size": 12, "memory_budget_gb": 1e-9})
    big = data_config({"name": "folder", "root": str(rgb_tree), "image_size": 12})
    assert small.load_splits()["train"].lazy and not big.load_splits()["train"].lazy


# -- augmentation -------------------------------------------------------------------------------
def test_augmentation_is_seeded_and_leaves_the_global_stream_alone():
    x = torch.rand(6, 3, 16, 16)
    aug = ImageAugment(crop="resized", crop_scale_min=0.3, flip=True, color_jitter=0.4, hue=0.1, rand_augment=True)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_augmentation_shards_union_to_the_single_process_batch():
    x = torch.rand(8, 3, 16, 16)
    aug = ImageAugment(crop="random", crop_padding=3, flip=True, color_jitter=0.4, affine={"degrees": 10.0})
    whole = aug(x, torch.Generator().manual_seed(7))
    parts = [aug(x[r * 4:(r + 1) * 4], torch.Generator().manual_seed(7), shard=(r, 2)) for r in range(2)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def test_colour_augmentation_of_grayscale_images_keeps_one_channel():
    x = torch.rand(4, 1, 12, 12)
    out = ImageAugment(color_jitter=0.5, flip=True)(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 12, 12)


def test_augment_config_builds_the_pipeline():
    cfg = make_config({"augment": {"crop": "resized", "flip": True, "color_jitter": 0.2}})
    aug = cfg.augment.augmenter()
    assert aug.crop == "resized" and aug.flip and aug.color_jitter == 0.2 and aug.affine is None
    assert make_config({}).augment.augmenter() is None


# -- normalisation inside the model -------------------------------------------------------------
def test_dataset_statistics_are_filled_in_and_travel_with_the_checkpoint(rgb_tree, tmp_path):
    cfg = make_config(tiny_config(tmp_path / "run", data={"name": "folder", "root": str(rgb_tree), "image_size": 16,
                                                          "normalize": "dataset", "val_fraction": 0.25,
                                                          "test_fraction": 0.25},
                                  task={"n_ways": 2, "k_shots": 1, "n_queries": 2},
                                  eval={"n_ways": 2, "k_shots": 1, "n_queries": 2, "val_episodes": 3}))
    trainer = Trainer(cfg)
    train = trainer.splits["train"]
    pixels = train.fetch(train.image_indices()).double() / 255
    mean = pixels.mean((0, 2, 3))
    assert trainer.config.data.mean == pytest.approx(mean.tolist(), abs=1e-5)
    bb = trainer.model.backbone
    assert torch.allclose(bb.input_mean, mean.float(), atol=1e-5)
    x = torch.rand(4, 3, 16, 16)
    trainer.model.eval()
    expected = bb.blocks((x - bb.input_mean.view(-1, 1, 1)) / bb.input_std.view(-1, 1, 1)).flatten(1)
    assert torch.allclose(bb(x), expected, atol=1e-6)
    path = save_checkpoint(tmp_path / "c.safetensors", trainer.model, trainer.config, step=0)
    loaded = load(path)
    assert torch.allclose(loaded.backbone(x), bb(x), atol=1e-6)


def test_imagenet_statistics_and_none():
    model = build_model(make_config({"data": {"name": "folder", "channels": 3, "normalize": "imagenet",
                                              "image_size": 16}}))
    assert model.backbone.input_std.tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert not hasattr(build_model(make_config({"data": {"name": "folder", "image_size": 16}})).backbone, "input_mean")


# -- the registry -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_data_source_builds_from_defaults_and_refuses_foreign_keys(name):
    cfg = data_config({"name": name})
    assert cfg.name == name and make_config({"data": {"name": name}}).data == cfg
    with pytest.raises(Exception, match=r"unknown key 'data\.no_such_key'; valid keys here: name"):
        data_config({"name": name, "no_such_key": 1})


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_data_source_round_trips_through_a_checkpoint(name, tmp_path):
    source = DATASETS[name]
    regression = source.task_kind == "regression"
    cfg = make_config({"data": {"name": name, **({} if regression else {"image_size": 16})},
                       "algorithm": {"name": "maml" if regression else "protonet"},
                       "backbone": {"name": "mlp"} if regression else {"name": "conv4", "hidden_channels": 4}})
    path = save_checkpoint(tmp_path / "c.safetensors", build_model(cfg), cfg, step=0)
    loaded = load(path)
    assert loaded.run_config.data == cfg.data
    fmt = cfg.data.image_format()
    assert (fmt is None) == regression


def test_unknown_data_name_lists_the_sources():
    with pytest.raises(Exception, match=r"data\.name must be one of \[.*'tiny_imagenet'.*\]; got 'imagenet21k'"):
        data_config({"name": "imagenet21k"})


def test_checkpoints_of_the_flat_data_config_still_load(tmp_path, synthetic_splits):
    cfg = make_config(tiny_config(tmp_path))
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "old.safetensors", model, cfg, step=0)
    # rewrite the stored config as metafit 0.1 wrote it: one flat data section with every key
    from metafit.training.checkpoint import read_checkpoint, write_checkpoint
    meta, tensors = read_checkpoint(path)
    meta["config"]["data"] = {"name": "folder", "root": None, "protocol": "vinyals", "image_size": 16,
                              "channels": None, "invert": False, "rotations": False, "val_fraction": 0.15,
                              "test_fraction": 0.15, "split_seed": 0, "download": False, "cache_dir": None,
                              "amplitude_min": 0.1, "amplitude_max": 5.0, "phase_min": 0.0,
                              "phase_max": 3.141592653589793, "x_min": -5.0, "x_max": 5.0}
    write_checkpoint(path, tensors, meta)
    assert load(path).run_config.data.image_size == 16
    assert "amplitude_min" not in migrate_legacy_data(meta["config"]["data"])


# -- Tiny ImageNet ------------------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tiny_zip(path, official: bool = False, drop: int = 0):
    split = published_split("tiny_imagenet")["splits"]
    wnids = sorted(split["train"] + split["val"] + split["test"])[drop:]
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for i, w in enumerate(wnids):
            for j in range(3):
                name = (f"tiny-imagenet-200/train/{w}/images/{w}_{j}.JPEG" if official
                        else f"tiny-imagenet/{w}/{w}_{j}.JPEG")
                zf.writestr(name, _jpeg(i * 10 + j))
        zf.writestr("tiny-imagenet/wnids.txt", "\n".join(wnids))
    return path


def test_published_tiny_imagenet_split_is_frozen():
    split = published_split("tiny_imagenet")
    sizes = {k: len(v) for k, v in split["splits"].items()}
    assert sizes == {"train": 130, "val": 32, "test": 40}
    every = split["splits"]["train"] + split["splits"]["val"] + split["splits"]["test"]
    assert len(set(every)) == 202
    assert split["splits"]["test"][:3] == ["n01443537", "n01644900", "n01742172"]


def test_tiny_imagenet_reads_the_zip_in_both_storages(tmp_path):
    path = _tiny_zip(tmp_path / "tiny-imagenet-train.zip")
    mem = data_config({"name": "tiny_imagenet", "root": str(tmp_path), "image_size": 8}).load_splits()
    lazy = data_config({"name": "tiny_imagenet", "root": str(path), "image_size": 8, "storage": "lazy"}).load_splits()
    assert {k: v.n_classes for k, v in mem.items()} == {"train": 130, "val": 32, "test": 40}
    test = lazy["test"]
    assert test.lazy and torch.equal(test.fetch(test.image_indices()), mem["test"].fetch(mem["test"].image_indices()))
    assert mem["test"].class_names[0] == "n01443537"


def test_tiny_imagenet_official_layout_misses_two_classes_at_most(tmp_path, caplog):
    _tiny_zip(tmp_path / "ok" / "tiny-imagenet-200.zip", official=True, drop=2)
    splits = data_config({"name": "tiny_imagenet", "root": str(tmp_path / "ok"), "image_size": 8}).load_splits()
    assert sum(s.n_classes for s in splits.values()) == 200
    _tiny_zip(tmp_path / "bad" / "tiny-imagenet-200.zip", official=True, drop=3)
    with pytest.raises(DataError, match=r"must hold every class of the published split .*got 3 missing"):
        data_config({"name": "tiny_imagenet", "root": str(tmp_path / "bad"), "image_size": 8}).load_splits()


def test_tiny_imagenet_missing_data_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("METAFIT_TINY_IMAGENET", raising=False)
    with pytest.raises(DataError, match=r"TinyImageNet: data.root must point at the dataset \(tiny-imagenet-train.zip"):
        data_config({"name": "tiny_imagenet"}).load_splits()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"must hold the images as tiny-imagenet-train.zip"):
        data_config({"name": "tiny_imagenet", "root": str(tmp_path / "empty")}).load_splits()


def test_tiny_imagenet_download_is_checksum_verified(tmp_path, monkeypatch, server):
    import hashlib

    import metafit.data.tiny_imagenet as ti

    www, url = server
    archive = _tiny_zip(www / "tiny-imagenet-200.zip", official=True, drop=2)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(ti, "TINY_IMAGENET_URL", (url + "tiny-imagenet-200.zip", f"md5:{md5}"))
    monkeypatch.delenv("METAFIT_TINY_IMAGENET", raising=False)
    cfg = data_config({"name": "tiny_imagenet", "download": True, "image_size": 8, "cache_dir": str(tmp_path / "c")})
    assert cfg.load_splits()["val"].n_classes >= 30
    assert (tmp_path / "c" / "tiny-imagenet" / "tiny-imagenet-200.zip").read_bytes() == archive.read_bytes()
    monkeypatch.setattr(ti, "TINY_IMAGENET_URL", (url + "tiny-imagenet-200.zip", "md5:" + "0" * 32))
    with pytest.raises(Exception, match="checksum"):
        data_config({"name": "tiny_imagenet", "download": True, "cache_dir": str(tmp_path / "d")}).load_splits()
    assert ImageFormat(8, 3, False, "crop") == cfg.image_format()
