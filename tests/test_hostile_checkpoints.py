"""Hostile checkpoints and task files against every loader.

A corpus generated from real files (a resumable few-shot ``last.safetensors``, a meta-RL one and
a saved task) and mutated: pickle payloads under every accepted suffix, damaged safetensors
headers (truncated, overlapping, oversized), wrong tensor dtypes, metadata nested 100,000 deep,
bad calibration temperatures and image formats, missing fields and wrong types. Every loader
(``metafit.load``, ``metafit.training.load``/``read_checkpoint``, ``metafit eval``, ``info``,
``predict`` with a task file, ``backbone.weights``, ``train --resume``, ``rl eval``, ``rl train
--resume``) must refuse each input with a one-line :class:`CheckpointError` (the CLI: exit code 1
and exactly one ``error:`` line, no traceback), or accept it where it is valid for that loader,
and no pickle may ever run. The untouched files pass every loader (so each refusal is the
mutation's doing)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import save as st_save

import metafit
import metafit.training
from conftest import tiny_config, write_image_tree
from metafit.cli.main import main
from metafit.errors import CheckpointError, MetafitError
from metafit.training import Trainer, make_config, read_checkpoint
from metafit.training.config import build_model
from metafit.inference import load_task
from metafit.training.pretrained import load_backbone_weights
from metafit.training.rl_run import load_rl, load_rl_config, train_rl
from metafit.validation import MAX_DOCUMENT_BYTES, MAX_NESTING

DEEP = 100_000
NESTED = "[" * DEEP + "]" * DEEP


class Payload:
    """Unpickling this creates the marker file: it must never happen."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- building blocks -------------------------------------------------------------------------
def _split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _file(tensors: dict, raw_meta: str | None, key: str = "metafit") -> bytes:
    return st_save(tensors, metadata=None if raw_meta is None else {key: raw_meta})


def _copy(obj):
    return json.loads(json.dumps(obj))


@dataclass
class Case:
    name: str
    data: bytes
    suffix: str = ".safetensors"
    accepted_by: frozenset = field(default_factory=frozenset)  # loaders for which the input is valid


def _file_cases(base: bytes, marker: Path) -> list[Case]:
    """Damaged or foreign files: every loader refuses them."""
    Payload.marker = str(marker)
    cases = []
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
            cases.append(Case(f"pickle-p{protocol}{suffix}", pickle.dumps({"x": Payload()}, protocol=protocol), suffix))
    import io

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, buf)
    for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        cases.append(Case(f"torch-save-zip{suffix}", buf.getvalue(), suffix))
    header, data = _split(base)
    names = [k for k in header if k != "__metadata__"]
    first, second = names[0], names[-1]

    def edit(fn) -> bytes:
        h = _copy(header)
        fn(h)
        return _join(h, data)

    cases += [
        Case("empty", b""), Case("7-bytes", base[:7]), Case("length-only", base[:8]),
        Case("truncated-200", base[:200]), Case("truncated-header", base[:8 + len(json.dumps(header)) // 2]),
        Case("truncated-data", base[:-100]), Case("trailing-garbage", base + b"\0" * 64),
        Case("header-length-2^63", (2 ** 63).to_bytes(8, "little") + base[8:]),
        Case("header-length-past-end", (len(base) + 1000).to_bytes(8, "little") + base[8:]),
        Case("header-length-1GiB", (2 ** 30).to_bytes(8, "little") + base[8:]),
        Case("overlapping-offsets", edit(lambda h: h[second].__setitem__("data_offsets", [0, 4]))
             if len(names) > 1 else _join(header, data[:4] + data)),
        Case("offsets-reversed", edit(lambda h: h[first].__setitem__("data_offsets", h[first]["data_offsets"][::-1]))),
        Case("offsets-past-end", edit(lambda h: h[first].__setitem__("data_offsets", [0, len(data) + 8]))),
        Case("unknown-dtype", edit(lambda h: h[first].__setitem__("dtype", "F99"))),
        Case("shape-larger-than-data", edit(lambda h: h[first].__setitem__("shape", [10 ** 6]))),
        Case("header-not-json", _join(b"{not json" + b" " * 40, data)),
        Case("header-a-list", _join(b"[1, 2, 3]", data)),
        Case("header-nested-100000", _join(b'{"a": ' + NESTED.encode() + b"}", data)),
        Case("metadata-not-a-string", edit(lambda h: h["__metadata__"].__setitem__("metafit", {"format": 1}))),
    ]
    return cases


WEIGHTS_OK = frozenset({"weights"})  # backbone weights files: metadata is not used, only tensors


def _meta_cases(meta: dict, tensors: dict) -> list[Case]:
    """Metadata the schema refuses (read_checkpoint and every loader); backbone.weights reads only
    the tensors, so it accepts them."""
    raw = json.dumps(meta)
    cases = [
        Case("metadata-nested-100000", _file(tensors, NESTED), accepted_by=WEIGHTS_OK),
        Case("metrics-nested-100000", _file(tensors, raw[:-1] + ', "deep": ' + NESTED + "}"), accepted_by=WEIGHTS_OK),
        Case(f"metrics-nested-{MAX_NESTING + 8}", _file(tensors, raw[:-1] + ', "deep": ' + "[" * (MAX_NESTING + 8)
                                                        + "]" * (MAX_NESTING + 8) + "}"), accepted_by=WEIGHTS_OK),
        Case("metadata-not-json", _file(tensors, raw[:-5]), accepted_by=WEIGHTS_OK),
        Case("metadata-a-list", _file(tensors, "[1, 2]"), accepted_by=WEIGHTS_OK),
        Case("metadata-17MiB", _file(tensors, raw[:-1] + ', "pad": "' + "x" * (MAX_DOCUMENT_BYTES + 2 ** 20) + '"}'),
             accepted_by=WEIGHTS_OK),
        Case("no-metadata", _file(tensors, None), accepted_by=WEIGHTS_OK),
    ]

    def mutated(name: str, fn: Callable[[dict], object], accepted=WEIGHTS_OK) -> None:
        m = _copy(meta)
        fn(m)
        text = json.dumps(m, allow_nan=True)
        cases.append(Case(name, _file(tensors, text), accepted_by=accepted))

    if "algorithm" in meta:  # (meta-RL checkpoints hold no calibration)
        for value in ("abc", [1], 0, -1.0, float("nan"), float("inf"), True, 1e-320, None):
            mutated(f"temperature={value!r}", lambda m, v=value: m.__setitem__("calibration", {"temperature": v}))
        mutated("calibration-a-list", lambda m: m.__setitem__("calibration", [2.0]))
    fmt = meta.get("image_format")
    if fmt is not None:
        mutated("image_format-extra-key", lambda m: m["image_format"].__setitem__("mode", "RGBA"))
        for key, value in (("size", 4096), ("size", "16"), ("size", 16.0), ("size", 0), ("channels", 2),
                           ("fit", "stretch"), ("invert", "no")):
            mutated(f"image_format.{key}={value!r}", lambda m, k=key, v=value: m["image_format"].__setitem__(k, v))
        mutated("image_format-a-list", lambda m: m.__setitem__("image_format", [16, 1]))
        mutated("image_format-missing-size", lambda m: m["image_format"].pop("size"))
    for key in ("format_version", "config", "step", "learner"):
        if key in meta:
            mutated(f"missing-{key}", lambda m, k=key: m.pop(k))
    if "algorithm" in meta:  # a metafit file of no declared kind (e.g. kept weights): read, but not a model
        mutated("missing-algorithm-and-kind", lambda m: (m.pop("algorithm"), m.pop("kind")),
                WEIGHTS_OK | {"read_checkpoint"})
        mutated("missing-algorithm", lambda m: m.pop("algorithm"))  # a few-shot checkpoint names its algorithm
    for key, value in (("step", "2"), ("step", -1), ("step", 2.5), ("step", True), ("config", [1]),
                       ("config", "protonet"), ("metrics", [1]), ("format_version", "1"), ("format_version", True),
                       ("format_version", 2), ("metafit_version", 1), ("kind", 5)):
        mutated(f"{key}={value!r}", lambda m, k=key, v=value: m.__setitem__(k, v))
    ts = "train_state"
    # the earlier layouts of train_state (and of few-shot metadata, without kind): read, loaded and resumed
    mutated("train_state-earlier-layout", lambda m: _earlier_layout(m), frozenset({"*"}))
    if "algorithm" in meta:
        mutated("algorithm=5", lambda m: m.__setitem__("algorithm", 5))
        mutated("kind=bogus", lambda m: m.__setitem__("kind", "bogus"))
        mutated("kind=rl", lambda m: m.__setitem__("kind", "rl"))  # then it must name a learner
        mutated("train_state-a-list", lambda m: m.__setitem__(ts, [1]))
        mutated("train_state.optimizer.name=rmsprop", lambda m: m[ts]["optimizer"].__setitem__("name", "rmsprop"))
        mutated("train_state.optimizer-missing-name", lambda m: m[ts]["optimizer"].pop("name"))
        mutated("train_state.optimizer.param_groups=[]", lambda m: m[ts]["optimizer"].__setitem__("param_groups", []))
        mutated("train_state.optimizer.param_groups-no-params", lambda m: m[ts]["optimizer"]["param_groups"][0].pop("params"))
        mutated("train_state.run.best_result-extra-key",
                lambda m: m[ts]["run"].__setitem__("best_result", {**m[ts]["run"]["best_result"], "bogus": 1}))
        mutated("train_state.run.best_result-missing-mean", lambda m: m[ts]["run"]["best_result"].pop("mean"))
        mutated("train_state.run.timing-not-numbers", lambda m: m[ts]["run"].__setitem__("timing", {"data_s": "x"}))
        mutated("train_state.window.n=-1", lambda m: m[ts].__setitem__("window", {"n": -1}))
        mutated("train_state.window.sums-not-numbers", lambda m: m[ts]["window"].__setitem__("sums", {"loss": "x"}))
        mutated("train_state.monitor.losses=abc", lambda m: m[ts].__setitem__("monitor", {"losses": "abc"}))
        mutated("train_state.best_step=-1", lambda m: m[ts].__setitem__("best_step", -1))
        mutated("train_state.optimizer.scalars-bad-index",
                lambda m: m[ts]["optimizer"].__setitem__("scalars", {"x": {}}))
        # only the required fields (what an older version may have written): the rest has defaults
        mutated("train_state-required-fields-only",
                lambda m: m.__setitem__(ts, {k: m[ts][k] for k in ("optimizer",)}), frozenset({"*"}))
    else:
        mutated("learner=5", lambda m: m.__setitem__("learner", 5))
        mutated("kind-missing", lambda m: m.pop("kind"), WEIGHTS_OK | {"read_checkpoint"})  # no kind: not a learner
        mutated("train_state.run.best_weights=bogus", lambda m: m[ts]["run"].__setitem__("best_weights", "bogus"))
        mutated("train_state.optimizer.param_groups=x",
                lambda m: m[ts]["optimizer"].__setitem__("param_groups", "x"))
        mutated("train_state.run.env_steps=-1", lambda m: m[ts]["run"].__setitem__("env_steps", -1))
        mutated("train_state.seconds=-1", lambda m: m[ts].__setitem__("seconds", -1.0))
        mutated("train_state-empty", lambda m: m.__setitem__(ts, {}),  # no optimizer state to resume
                frozenset({"read_checkpoint", "load_rl", "rl_eval", "info"}))
    return cases


def _earlier_layout(meta: dict) -> None:
    """Rewrite ``meta`` (in place) as the version before the one loop wrote it: few-shot metadata
    without ``kind`` and each kind's own ``train_state`` layout."""
    ts = meta["train_state"]
    run, opt, window = ts.pop("run"), ts.pop("optimizer"), ts.pop("window")
    if meta.pop("kind") == "few-shot":
        meta["train_state"] = {
            "optimizer": opt["name"], "param_groups": opt["param_groups"], "optimizer_scalars": opt["scalars"],
            "best_val": ts["best_score"], "best_step": ts["best_step"], "best_result": run["best_result"],
            "train_seconds": ts["seconds"], "timing": run["timing"], "monitor": ts["monitor"], "events": ts["events"],
            "window": {**window["sums"], **{k: window[k] for k in ("n", "steps", "seconds")}}}
    else:
        meta["kind"] = "rl"
        meta["train_state"] = {"best": ts["best_score"], "best_iteration": ts["best_step"], "seconds": ts["seconds"],
                               "optimizer": opt, **run}


def _model_cases(meta: dict, tensors: dict, weight: str, rl: bool = False) -> list[Case]:
    """Valid metadata whose config or tensors do not describe a buildable model: refused where a
    model is built from them (read_checkpoint returns the tensors as they are)."""
    raw = json.dumps(meta)
    cases = []

    def with_tensors(name: str, accepted: set, fn: Callable[[dict], object]) -> None:
        t = dict(tensors)
        fn(t)
        cases.append(Case(name, _file(t, raw), accepted_by=frozenset({"read_checkpoint", *accepted})))

    def with_config(name: str, accepted: set, fn: Callable[[dict], object]) -> None:
        m = _copy(meta)
        fn(m)
        cases.append(Case(name, _file(tensors, json.dumps(m)), accepted_by=frozenset({"read_checkpoint", *accepted})))

    w = tensors[weight]
    for dtype in (torch.bool, torch.int64, torch.complex64):
        with_tensors(f"weight-{dtype}", set(), lambda t, d=dtype: t.__setitem__(weight, w.to(d)))
    for dtype in (torch.float64, torch.float16):  # a weights file may hold other float widths: converted
        with_tensors(f"weight-{dtype}", {"weights"}, lambda t, d=dtype: t.__setitem__(weight, w.to(d)))
    with_tensors("weight-missing", {"weights"}, lambda t: t.pop(weight))
    with_tensors("tensor-unexpected", {"weights"}, lambda t: t.__setitem__("model.bogus", torch.zeros(2)))
    with_tensors("weight-other-shape", set(), lambda t: t.__setitem__(weight, torch.zeros(w.numel() + 1)))
    resume = "rl_resume" if rl else "resume"
    not_resume = {"load", "training.load", "eval", "info", "predict", "weights", "load_rl", "rl_eval", "metafit.load"}
    with_tensors("rng.torch-missing", not_resume, lambda t: t.pop("rng.torch"))
    with_tensors("rng.torch-float32", not_resume, lambda t: t.__setitem__("rng.torch", t["rng.torch"].float()))
    with_tensors("rng.torch-short", not_resume, lambda t: t.__setitem__("rng.torch", t["rng.torch"][:100]))
    optim = next(k for k in tensors if k.startswith("optim.") and not k.endswith(".step"))
    with_tensors("optimizer-tensor-int64", not_resume, lambda t: t.__setitem__(optim, t[optim].long()))
    with_tensors("optimizer-tensor-other-shape", not_resume, lambda t: t.__setitem__(optim, torch.zeros(3)))
    with_tensors("optimizer-tensor-bad-name", not_resume, lambda t: t.__setitem__("optim.x.exp_avg", torch.zeros(1)))
    with_tensors("optimizer-tensor-index-99", not_resume, lambda t: t.__setitem__("optim.99.exp_avg", torch.zeros(1)))
    if rl:
        with_tensors("rng.tasks-int64", not_resume, lambda t: t.__setitem__("rng.tasks", t["rng.tasks"].long()))
        with_config("learner.hidden_size-changed", {"weights"},
                    lambda m: m["config"]["learner"].__setitem__("hidden_size", 16))
        with_config("learner.hidden_size=-1", {"weights"},
                    lambda m: m["config"]["learner"].__setitem__("hidden_size", -1))
        with_config("family.name=chess", {"weights"}, lambda m: m["config"]["family"].__setitem__("name", "chess"))
    else:
        with_tensors("rng.sampler-int64", not_resume, lambda t: t.__setitem__("rng.sampler", t["rng.sampler"].long()))
        with_config("config-train.optimizer=rmsprop", {"weights"},
                    lambda m: m["config"]["train"].__setitem__("optimizer", "rmsprop"))
        with_config("config-empty", {"weights"}, lambda m: m.__setitem__("config", {}))
        with_config("config-backbone-wider", {"weights"},
                    lambda m: m["config"]["backbone"].__setitem__("hidden_channels", 8))
        with_config("config-backbone-unknown-key", {"weights"},
                    lambda m: m["config"]["backbone"].__setitem__("bogus", 1))
        with_config("image_format-not-the-configs", {"weights", resume},
                    lambda m: m["image_format"].__setitem__("size", 32))
    return cases


# -- the world: real files to mutate ----------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = write_image_tree(root / "data", n_classes=9, per_class=4, size=16)
    cfg = tiny_config(root / "run", data={"root": str(data), "val_fraction": 0.34, "test_fraction": 0.33},
                      task={"n_ways": 3}, backbone={"hidden_channels": 4},
                      eval={"n_ways": 3, "val_episodes": 2, "test_episodes": 2, "calibrate": False},
                      train={"meta_steps": 2, "eval_every": 2, "save_interval": 2})
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    Trainer(make_config(cfg)).fit()
    base = root / "run" / "last.safetensors"
    support = write_image_tree(root / "support", n_classes=3, per_class=1, size=16)
    images = sorted(support.rglob("*.png"))
    files = [str(p) for p in images]
    task = metafit.load(base).adapt(files, [p.parent.name for p in images])
    task_path = task.save(root / "task.safetensors")

    rl_overrides = [f"out_dir={root / 'rl'}", "train.iterations=2", "train.eval_every=2", "train.save_interval=2",
                    "train.eval_tasks=4", "train.test_tasks=4", "train.progress=false", "train.tensorboard=false",
                    "learner.hidden_size=8", "learner.meta_batch_size=4", "learner.n_episodes=3"]
    rl_config = load_rl_config("rl2_bandit_k5_n10", rl_overrides)
    train_rl(rl_config, test=False)
    rl_yaml = root / "rl.yaml"
    rl_yaml.write_text(yaml.safe_dump(rl_config.to_dict()))
    return {"root": root, "config": config_path, "base": base, "task": task_path, "image": files[0],
            "rl_base": root / "rl" / "last.safetensors", "rl_config": rl_yaml, "cfg": make_config(cfg)}


def _write(folder: Path, cases: list[Case]) -> list[tuple[Case, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, case in enumerate(cases):
        path = folder / f"{i:03d}{case.suffix}"
        path.write_bytes(case.data)
        out.append((case, path))
    return out


def _corpus(world, marker: Path, rl: bool = False) -> list[tuple[Case, Path]]:
    base = world["rl_base" if rl else "base"]
    blob = base.read_bytes()
    meta, tensors = read_checkpoint(base)
    weight = next(k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point() and v.dim() > 1)
    cases = ([Case("pristine", blob, accepted_by=frozenset({"*"}))] + _file_cases(blob, marker)
             + _meta_cases(meta, tensors) + _model_cases(meta, tensors, weight, rl=rl))
    return _write(world["root"] / ("rl-corpus" if rl else "corpus"), cases)


class Tally:
    """Outcome of each hostile input per loader: a failure is anything but a clean refusal (or,
    where the input is valid for the loader, a success)."""

    def __init__(self, loader: str, marker: Path) -> None:
        self.loader, self.marker = loader, marker
        self.tried = self.refused = self.accepted = 0
        self.failures: list[str] = []

    def expect(self, case: Case, refused: bool, detail: str) -> None:
        self.tried += 1
        accepted = "*" in case.accepted_by or self.loader in case.accepted_by
        if self.marker.exists():
            self.failures.append(f"{case.name}: the pickle payload ran")
            self.marker.unlink()
        if refused and not accepted:
            self.refused += 1
        elif not refused and accepted:
            self.accepted += 1
        else:
            self.failures.append(f"{case.name}: {'refused' if refused else 'accepted'} ({detail})")

    def check(self) -> None:
        print(f"\n{self.loader}: {self.tried} inputs, {self.refused} refused with a clean one-line error, "
              f"{self.accepted} accepted as valid for this loader")
        assert not self.failures, "\n".join(self.failures)


def _api(tally: Tally, case: Case, call: Callable[[], object]) -> None:
    try:
        call()
    except CheckpointError as err:
        message = str(err)
        clean = "\n" not in message and len(message) <= 600 and message.split(":")[0] in ("Checkpoint", "Trainer", "RL",
                                                                                         "Task", "Weights")
        if clean:
            tally.expect(case, True, message[:160])
        else:
            tally.tried += 1
            tally.failures.append(f"{case.name}: {message!r}")
        return
    except Exception as err:  # noqa: BLE001 - any other exception is the failure under test
        tally.tried += 1
        tally.failures.append(f"{case.name}: {type(err).__name__}: {str(err)[:200]}")
        return
    tally.expect(case, False, "no error")


def _cli(tally: Tally, case: Case, capsys, argv: list[str]) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    if code == 0:
        tally.expect(case, False, "exit 0")
        return
    one_line = (code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
                and not err.startswith("error: unexpected ") and "bug in metafit" not in err)
    if one_line:
        tally.expect(case, True, err.strip()[:160])
    else:
        tally.tried += 1
        tally.failures.append(f"{case.name}: exit {code}, stderr {err[-400:]!r}")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


# -- few-shot checkpoints ------------------------------------------------------------------------
def test_python_loaders_refuse_every_hostile_checkpoint(world, marker):
    corpus = _corpus(world, marker)
    tallies = {name: Tally(name, marker) for name in ("metafit.load", "training.load", "read_checkpoint")}
    for case, path in corpus:
        _api(tallies["metafit.load"], case, lambda: metafit.load(path))
        _api(tallies["training.load"], case, lambda: metafit.training.load(path))
        _api(tallies["read_checkpoint"], case, lambda: read_checkpoint(path))
    for t in tallies.values():
        t.check()
    assert not marker.exists()


def test_eval_info_and_resume_refuse_every_hostile_checkpoint(world, marker, capsys):
    corpus = _corpus(world, marker)
    tallies = {name: Tally(name, marker) for name in ("eval", "info", "resume")}
    for i, (case, path) in enumerate(corpus):
        _cli(tallies["eval"], case, capsys, ["eval", str(path), "--episodes", "1"])
        _cli(tallies["info"], case, capsys, ["info", str(path)])
        _cli(tallies["resume"], case, capsys, ["train", str(world["config"]), "--resume", str(path), "--no-test",
                                               "--out-dir", str(world["root"] / "resumed" / str(i))])
    for t in tallies.values():
        t.check()


def test_predict_with_a_task_file_of_each_hostile_checkpoint(world, marker, capsys):
    """A saved task names its checkpoint; `metafit predict TASK` loads that checkpoint."""
    corpus = _corpus(world, marker)
    from safetensors import safe_open

    with safe_open(str(world["task"]), framework="pt") as f:
        task_meta = json.loads(f.metadata()["metafit_task"])
        task_tensors = {k: f.get_tensor(k) for k in f.keys()}
    tally = Tally("predict", marker)
    folder = world["root"] / "task-of-corpus"
    folder.mkdir(exist_ok=True)
    for i, (case, path) in enumerate(corpus):
        task = folder / f"{i:03d}.safetensors"
        meta = {**task_meta, "checkpoint": str(path), "checkpoint_sha256": None}
        task.write_bytes(_file(task_tensors, json.dumps(meta), key="metafit_task"))
        _cli(tally, case, capsys, ["predict", str(task), "--images", world["image"]])
    tally.check()


def test_backbone_weights_refuse_damaged_files_and_read_only_tensors(world, marker, capsys):
    """backbone.weights reads tensors (metadata is not used): damaged files and tensors of another
    kind (bool, integer, complex, other shapes) are refused through `metafit train`; files whose
    only problem is their metafit metadata load their weights."""
    corpus = _corpus(world, marker)
    tally = Tally("weights", marker)
    for i, (case, path) in enumerate(corpus):
        if "weights" in case.accepted_by or "*" in case.accepted_by:
            module = build_model(world["cfg"], pretrained=False).backbone
            _api(tally, case, lambda: load_backbone_weights(module, path))
        else:
            _cli(tally, case, capsys, ["train", str(world["config"]), "--no-test", "--set", f"backbone.weights={path}",
                                       "--out-dir", str(world["root"] / "weights-run" / str(i))])
    tally.check()


# -- meta-RL checkpoints -------------------------------------------------------------------------
def test_rl_loaders_refuse_every_hostile_checkpoint_and_info_shows_rl_checkpoints(world, marker, capsys):
    corpus = _corpus(world, marker, rl=True)
    tallies = {name: Tally(name, marker) for name in ("load_rl", "rl_eval", "info", "rl_resume")}
    # metafit.load / metafit info of a good RL checkpoint: a clear refusal, and a description
    with pytest.raises(CheckpointError, match="meta-RL checkpoint"):
        metafit.load(world["rl_base"])
    assert main(["info", str(world["rl_base"])]) == 0
    out = capsys.readouterr().out
    assert "learner      rl2" in out and "family       bandit" in out and "resumable True" in out
    for i, (case, path) in enumerate(corpus):
        _api(tallies["load_rl"], case, lambda: load_rl(path))
        _cli(tallies["rl_eval"], case, capsys, ["rl", "eval", str(path), "--tasks", "2"])
        _cli(tallies["info"], case, capsys, ["info", str(path)])
        run = world["root"] / "rl-resumed" / str(i)
        run.mkdir(parents=True)
        shutil.copyfile(path, run / "last.safetensors")
        _cli(tallies["rl_resume"], case, capsys, ["rl", "train", str(world["rl_config"]), "--resume", "--no-test",
                                                  "--out-dir", str(run)])
    for t in tallies.values():
        t.check()


# -- saved tasks ---------------------------------------------------------------------------------
def test_hostile_task_files_are_refused_by_predict_and_load_task(world, marker, capsys):
    from safetensors import safe_open

    with safe_open(str(world["task"]), framework="pt") as f:
        meta = json.loads(f.metadata()["metafit_task"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    good = _file(tensors, json.dumps(meta), key="metafit_task")
    cases = [Case("pristine", good, accepted_by=frozenset({"*"}))] + _file_cases(good, marker)
    raw = json.dumps(meta)

    def task(name: str, fn=None, t=None, text: str | None = None, accepted=frozenset()) -> None:
        m = _copy(meta)
        if fn is not None:
            fn(m)
        cases.append(Case(name, _file(t if t is not None else tensors, text if text is not None else json.dumps(m),
                                      key="metafit_task"), accepted_by=accepted))

    task("metadata-nested-100000", text=NESTED)
    task("values-nested-100000", text=raw[:-1] + ', "deep": ' + NESTED + "}")
    task("metadata-not-json", text=raw[:-3])
    task("metadata-a-list", text="[1]")
    for key in ("class_names", "adapted_type", "format_version", "algorithm"):
        task(f"missing-{key}", lambda m, k=key: m.pop(k))
    for key, value in (("class_names", ["one"]), ("class_names", [[1], [2]]), ("class_names", "abc"),
                       ("adapted_type", "Adapted"), ("adapted_type", "Bogus"), ("adapted_type", 5),
                       ("values", {"params": "abc"}), ("values", {"bogus": 1}), ("values", [1]),
                       ("dict_fields", "params"), ("checkpoint_sha256", "xyz"), ("checkpoint", 5),
                       ("format_version", 2), ("algorithm", "maml")):
        task(f"{key}={value!r}", lambda m, k=key, v=value: m.__setitem__(k, v))
    task("checkpoint-missing-file", lambda m: m.__setitem__("checkpoint", str(world["root"] / "gone.safetensors")))
    task("class_names-one-too-many", lambda m: m.__setitem__("class_names", m["class_names"] + ["extra"]),
         accepted=frozenset({"load_task"}))  # loads; predicting names the mismatch
    name = next(iter(tensors))
    for dtype in (torch.int64, torch.bool, torch.float64, torch.complex64):
        task(f"tensor-{dtype}", t={**tensors, name: tensors[name].to(dtype)})
    task("tensor-unexpected", t={**tensors, "adapted.bogus": torch.zeros(2)})
    task("tensor-missing", t={k: v for k, v in tensors.items() if k != name})
    corpus = _write(world["root"] / "task-corpus", cases)
    cli, api = Tally("predict", marker), Tally("load_task", marker)
    for case, path in corpus:
        _cli(cli, case, capsys, ["predict", str(path), "--images", world["image"]])
        _api(api, case, lambda: load_task(path))
    cli.check()
    api.check()
    assert not marker.exists()


def test_a_valid_calibration_and_an_older_checkpoint_still_load(world, tmp_path):
    """The schema keeps what older versions wrote: no image_format (derived from the config), no
    window in train_state, and an int temperature."""
    meta, tensors = read_checkpoint(world["base"])
    meta.pop("image_format")
    meta["train_state"].pop("window")
    meta.pop("metafit_version")
    meta["calibration"] = {"temperature": 2, "episodes": 5, "future_field": [1, 2]}
    path = tmp_path / "old.safetensors"
    path.write_bytes(_file(tensors, json.dumps(meta)))
    model = metafit.load(path)
    assert model.temperature == 2.0 and model.image_format.size == 16
    assert main(["info", str(path)]) == 0
    # calibrating a near-uniform model fits a huge temperature: valid (uniform, finite probabilities)
    meta["calibration"] = {"temperature": 2.35e8}
    path.write_bytes(_file(tensors, json.dumps(meta)))
    model = metafit.load(path)
    files = [world["image"]] * 3
    probabilities = model.adapt(files, ["a", "b", "c"]).predict(files).probabilities
    assert torch.isfinite(probabilities).all() and math.isclose(float(probabilities[0, 0]), 1 / 3, rel_tol=1e-4)
    with pytest.raises(MetafitError):
        metafit.load(tmp_path / "absent.safetensors")
