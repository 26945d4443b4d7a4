"""The HTTP service, end to end over real HTTP on 127.0.0.1 (uvicorn in a thread)."""

from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import metafit  # noqa: E402
from conftest import tiny_config, write_image_tree  # noqa: E402
from metafit import TaskError  # noqa: E402
from metafit.cli.main import build_parser  # noqa: E402
from metafit.data import list_labelled_images  # noqa: E402
from metafit.serve import ServeLimits, create_app  # noqa: E402
from metafit.training import build_model, make_config, save_checkpoint  # noqa: E402


def _checkpoint(tmp_path, name="protonet"):
    cfg = make_config(tiny_config(tmp_path / f"run-{name}", algorithm={"name": name}))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / f"{name}.safetensors", build_model(cfg), cfg, step=1)


@contextmanager
def serving(checkpoint, **limits):
    app = create_app(metafit.load(checkpoint), ServeLimits(**limits))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def support(tmp_path):
    root = write_image_tree(tmp_path / "support", n_classes=5, per_class=1, size=20)
    files, labels = list_labelled_images(root)
    return files, labels


def _files(paths):
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _png(size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


def test_create_predict_list_delete(tmp_path, support):
    files, labels = support
    with serving(_checkpoint(tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        info = c.get("/info").json()
        assert info["algorithm"] == "protonet" and info["image_format"] == {"size": 16, "channels": 1, "invert": False, "fit": "squash"}
        assert "/tasks/{task_id}/predict" in c.get("/openapi.json").json()["paths"]
        r = c.post("/tasks", files=_files(files), data={"labels": labels})
        assert r.status_code == 201, r.text
        task = r.json()
        assert task["class_names"] == labels and task["n_support"] == 5 and task["bytes"] > 0
        r = c.post(f"/tasks/{task['task_id']}/predict", files=_files(files), params={"top_k": 2})
        preds = r.json()["predictions"]
        assert [p["label"] for p in preds] == labels and len(preds[0]["top_k"]) == 2
        r = c.post(f"/tasks/{task['task_id']}/predict", files=_files(files), params={"abstain_below": 1.0})
        assert all(p["label"] is None and p["abstained"] for p in r.json()["predictions"] if p["probability"] < 1.0)
        r = c.post(f"/tasks/{task['task_id']}/predict", files=_files(files), params={"abstain_below": 2.0})
        assert r.status_code == 400 and "abstain_below must be a probability" in r.json()["error"]
        assert [t["task_id"] for t in c.get("/tasks").json()["tasks"]] == [task["task_id"]]
        assert c.delete(f"/tasks/{task['task_id']}").status_code == 204
        r = c.post(f"/tasks/{task['task_id']}/predict", files=_files(files[:1]))
        assert r.status_code == 404 and "task_id must name a kept task" in r.json()["error"]
        # labels as one JSON list work too
        r = c.post("/tasks", files=_files(files), data={"labels": '["a", "b", "c", "d", "e"]'})
        assert r.status_code == 201 and r.json()["class_names"] == ["a", "b", "c", "d", "e"]


def test_bad_input_gets_the_python_message_and_the_server_keeps_serving(tmp_path, support):
    files, labels = support
    ckpt = _checkpoint(tmp_path)
    with pytest.raises(TaskError) as expected:
        metafit.load(ckpt).adapt(files, labels[:-1])
    with serving(ckpt, max_images=6, max_image_pixels=64 * 64, max_body_bytes=200_000) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/tasks", files=_files(files), data={"labels": labels[:-1]})
        assert r.status_code == 400 and r.json()["error"] == str(expected.value)
        r = c.post("/tasks", files=[("images", ("x.png", b"not an image", "image/png"))] + _files(files[:1]),
                   data={"labels": ["a", "b"]})
        assert r.status_code == 400 and "'x.png' must be an image" in r.json()["error"]
        r = c.post("/tasks", files=[("images", ("big.png", _png((100, 100)), "image/png"))] + _files(files[:1]),
                   data={"labels": ["a", "b"]})
        assert r.status_code == 413 and "at most 4096 pixels" in r.json()["error"]
        r = c.post("/tasks", files=_files(files + files[:2]), data={"labels": labels + labels[:2]})
        assert r.status_code == 413 and "at most 6 images" in r.json()["error"]
        r = c.post("/tasks", files=[("images", ("huge.png", b"0" * 300_000, "image/png"))], data={"labels": ["a"]})
        assert r.status_code == 413 and "at most 200000 bytes" in r.json()["error"]
        r = c.post("/tasks", data={"labels": ["a"]})
        assert r.status_code == 422 and "images" in r.json()["error"]
        r = c.post("/tasks/nope/predict", files=_files(files[:1]))
        assert r.status_code == 404
        # still serving, and correctly
        task = c.post("/tasks", files=_files(files), data={"labels": labels}).json()
        r = c.post(f"/tasks/{task['task_id']}/predict", files=_files(files))
        assert [p["label"] for p in r.json()["predictions"]] == labels


def test_too_many_classes_for_a_fixed_head_model(tmp_path, support):
    files, labels = support
    ckpt = _checkpoint(tmp_path, "maml")  # its head has 5 outputs
    with serving(ckpt) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/tasks", files=_files(files[:3]), data={"labels": labels[:3]})
        assert r.status_code == 400 and "n_ways must equal the 5 outputs" in r.json()["error"]


def test_least_recently_used_tasks_are_evicted_and_the_api_key_is_checked(tmp_path, support):
    files, labels = support
    with serving(_checkpoint(tmp_path), max_tasks=2, api_key="s3cret") as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200  # liveness needs no key
        r = c.get("/info")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert c.get("/info", headers={"X-API-Key": "wrong"}).status_code == 401
        key = {"X-API-Key": "s3cret"}
        ids = [c.post("/tasks", files=_files(files), data={"labels": labels}, headers=key).json()["task_id"]
               for _ in range(3)]
        kept = [t["task_id"] for t in c.get("/tasks", headers={"Authorization": "Bearer s3cret"}).json()["tasks"]]
        assert kept == ids[1:]


def test_concurrent_clients_get_every_answer_right(tmp_path, support):
    files, labels = support
    with serving(_checkpoint(tmp_path)) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            task_id = c.post("/tasks", files=_files(files), data={"labels": labels}).json()["task_id"]

        def client(k: int) -> int:
            wrong = 0
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(50):
                    j = (k + i) % len(files)
                    r = c.post(f"/tasks/{task_id}/predict", files=_files([files[j]]))
                    wrong += r.status_code != 200 or r.json()["predictions"][0]["label"] != labels[j]
            return wrong

        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(client, range(16))) == 0


def test_serve_binds_to_loopback_by_default():
    args = build_parser().parse_args(["serve", "model.safetensors"])
    assert args.host == "127.0.0.1"
