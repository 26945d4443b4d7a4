"""Adding an algorithm or a dataset takes one file plus one registry line (``tests/toys``), and
the new thing is picked up by the CLI, checkpoints, ``metafit.load``, task files, the service
and its contract suite."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import metafit
import toys
from metafit.cli.main import main
from metafit.data import data_config

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from metafit.serve import create_app  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def registered(monkeypatch):
    for registry, key, value in toys.registrations():
        monkeypatch.setitem(registry, key, value)


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buf, "PNG")
    return buf.getvalue()


def test_cli_checkpoints_load_tasks_and_the_service_pick_up_a_new_algorithm_and_dataset(registered, tmp_path, capsys):
    assert main(["configs", "--fields", "matching_lite"]) == 0
    assert "scale" in capsys.readouterr().out
    assert main(["configs", "--fields", "toy_blocks"]) == 0
    assert "noise" in capsys.readouterr().out
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "out_dir": str(tmp_path / "run"),
        "data": {"name": "toy_blocks"}, "algorithm": {"name": "matching_lite", "scale": 5.0},
        "backbone": {"name": "conv4", "hidden_channels": 8},
        "task": {"n_ways": 3, "k_shots": 1, "n_queries": 2},
        "eval": {"n_ways": 3, "k_shots": 1, "n_queries": 2, "val_episodes": 6, "test_episodes": 10},
        "train": {"meta_steps": 4, "eval_every": 2, "save_interval": 2, "log_every": 2, "progress": False}}))
    assert main(["train", str(config)]) == 0
    best = tmp_path / "run" / "best.safetensors"
    assert best.is_file()
    assert main(["eval", str(best), "--episodes", "5"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["info", str(best)]) == 0
    assert "matching_lite" in capsys.readouterr().out

    model = metafit.load(best)
    assert model.algorithm.name == "matching_lite" and model.run_config.data.name == "toy_blocks"
    test = data_config({"name": "toy_blocks"}).load_splits()["test"]
    support = [test.images[int(test.class_start[c])] for c in range(3)]
    queries = [test.images[int(test.class_start[c]) + 1] for c in range(3)]
    task = model.adapt([Image.fromarray(x[0].numpy()) for x in support], ["a", "b", "c"])
    first = task.predict([Image.fromarray(x[0].numpy()) for x in queries])
    saved = metafit.load_task(task.save(tmp_path / "task.safetensors"), model)
    again = saved.predict([Image.fromarray(x[0].numpy()) for x in queries])
    assert again.labels == first.labels and again.probabilities.allclose(first.probabilities)

    with TestClient(create_app(model)) as client:
        assert client.get("/info").json()["algorithm"] == "matching_lite"
        files = [("images", (f"{i}.png", _png(x), "image/png")) for i, x in enumerate(support)]
        r = client.post("/tasks", files=files, data={"labels": ["a", "b", "c"]})
        assert r.status_code == 201, r.text
        files = [("images", (f"q{i}.png", _png(x), "image/png")) for i, x in enumerate(queries)]
        r = client.post(f"/tasks/{r.json()['task_id']}/predict", files=files)
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == first.labels


def test_the_contract_suites_cover_the_new_algorithm_and_dataset():
    """The suites are parametrised over the registries: with the toys registered (conftest.py reads
    METAFIT_TEST_TOYS) they run every contract test on them too."""
    env = {**os.environ, "METAFIT_TEST_TOYS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py",
         "tests/test_natural_images.py", "-k", "matching_lite or toy_blocks"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("8 passed"), summary  # 6 algorithm contract tests + 2 data-source ones
