"""The HTTP service, end to end over real HTTP on 127.0.0.1 (uvicorn in a thread)."""

from __future__ import annotations

import http.client
import io
import json
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
from metafit.cli.main import build_parser, main  # noqa: E402
from metafit.data import list_labelled_images  # noqa: E402
from metafit.serve import ServeLimits, create_app  # noqa: E402
from metafit.serve.app import DecodeBudget, HTTPError  # noqa: E402
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
        assert r.status_code == 400 and "'x.png' must be a readable image" in r.json()["error"]
        assert " at 0x" not in r.json()["error"]  # no Python reprs of in-memory objects
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


def _multipart(parts: list[tuple[str, str | None, bytes]],
               boundary: str = "metafit-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body from (field, filename or None, data)."""
    out = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: image/png\r\n" if filename else ""
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_malformed_fields_get_4xx_json_and_keep_the_connection(tmp_path, support):
    files, labels = support
    png = files[0].read_bytes()
    with serving(_checkpoint(tmp_path)) as url:
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        sock = None

        def ask(body: bytes, ctype: str, path: str = "/tasks") -> tuple[int, dict]:
            nonlocal sock
            conn.request("POST", path, body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            payload = json.loads(r.read())
            assert r.getheader("content-type") == "application/json" and conn.sock is not None
            assert sock is None or conn.sock is sock, "the keep-alive connection was dropped"
            sock = conn.sock
            return r.status, payload

        images = [("images", f.name, f.read_bytes()) for f in files[:2]]
        for raw, expected in [
            (b"[" * 100_000, "Serve: the labels field must nest at most 32 levels deep"),
            (b"[" * 40 + b"]" * 40, "Serve: the labels field must nest lists/mappings at most 32 levels deep"),
            (b'["a", ', "Serve: the labels field must be valid JSON"),
            (b'["a", {"b": [1, 2, 3, 4, 5, 6]}]',
             "Serve: labels must be strings or integers; got {'b': [1, 2, 3, 4, ...]}"),
            (b'["a", true]', "Serve: labels must be strings or integers; got True"),
        ]:
            status, payload = ask(*_multipart(images + [("labels", None, raw)]))
            assert status == 400 and payload["error"].startswith(expected), payload
            assert "\n" not in payload["error"] and len(payload["error"]) < 400
        status, payload = ask(*_multipart([("images", "a.png", png), ("labels", None, b"x" * 500)]))
        assert status == 400 and "a task needs at least 2 classes" in payload["error"] and len(payload["error"]) <= 600
        status, payload = ask(b"--metafit-test-boundary\r\ngarbage",
                              "multipart/form-data; boundary=metafit-test-boundary")
        assert 400 <= status < 500 and payload["error"].startswith("Serve: "), payload
        task_id = ask(*_multipart(images + [("labels", None, b'["a", "b"]')]))[1]["task_id"]
        status, payload = ask(*_multipart(images), f"/tasks/{task_id}/predict?top_k=lots")
        assert status == 422 and "top_k" in payload["error"]
        status, payload = ask(*_multipart(images), f"/tasks/{task_id}/predict?abstain_below=nan")
        assert status == 400 and "abstain_below must be a probability" in payload["error"]
        status, payload = ask(*_multipart(images), "/tasks/" + "x" * 5000 + "/predict")
        assert status == 404 and len(payload["error"]) < 400
        status, payload = ask(*_multipart(images), f"/tasks/{task_id}/predict")
        assert status == 200 and len(payload["predictions"]) == 2
        conn.close()


def test_chunked_uploads_are_held_to_the_body_limit(tmp_path, support):
    files, labels = support
    with serving(_checkpoint(tmp_path), max_body_bytes=200_000) as url, httpx.Client(base_url=url, timeout=30) as c:
        body, ctype = _multipart([("images", "a.png", b"0" * 300_000), ("labels", None, b"a")])
        r = c.post("/tasks", content=iter([body[i:i + 16_384] for i in range(0, len(body), 16_384)]),
                   headers={"Content-Type": ctype})  # an iterator: sent chunked, without Content-Length
        assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
        assert r.status_code == 413 and "request body must be at most 200000 bytes" in r.json()["error"]
        body, ctype = _multipart([("images", f.name, f.read_bytes()) for f in files]
                                 + [("labels", None, json.dumps(labels).encode())])
        r = c.post("/tasks", content=iter([body]), headers={"Content-Type": ctype})  # chunked, within the limit
        assert r.status_code == 201 and r.json()["class_names"] == labels


def test_info_shows_the_limits_and_not_the_checkpoint_path(tmp_path, support):
    files, labels = support
    with serving(_checkpoint(tmp_path), max_request_decoded_bytes=1500) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        info = c.get("/info").json()
        assert info["checkpoint"] == "protonet.safetensors" and str(tmp_path) not in json.dumps(info)
        assert info["limits"] == {"max_body_bytes": 32 * 2**20, "max_images": 256, "max_image_pixels": 4096 * 4096,
                                  "max_request_decoded_bytes": 1500, "max_decoding_bytes": 256 * 2**20,
                                  "decode_wait_s": 30.0, "max_tasks": 64, "api_key": False}
        r = c.post("/tasks", files=_files(files), data={"labels": labels})  # 5 images of 20x20 grayscale: 2000 bytes
        assert r.status_code == 413 and "must decode to at most 1500 bytes together; got 2000 bytes from 5 images" \
            in r.json()["error"]
        assert c.post("/tasks", files=_files(files[:3]), data={"labels": labels[:3]}).status_code == 201
    with pytest.raises(metafit.ConfigError, match="ServeLimits.max_images must be a positive number; got 0"):
        ServeLimits(max_images=0)


def test_decoding_waits_for_room_then_answers_503():
    budget = DecodeBudget(100, wait_s=0.05)
    with budget.hold(80):
        with pytest.raises(HTTPError) as err:
            with budget.hold(30):
                pass
        assert err.value.status == 503 and "Retry the request later" in err.value.message
        with budget.hold(20):  # what fits goes ahead
            assert budget.used == 100
    with budget.hold(10_000):  # one image larger than the whole budget runs alone
        assert budget.used == 100
    assert budget.used == 0


def test_serve_on_a_port_in_use_is_a_one_line_error(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        code = main(["serve", str(tmp_path / "never-loaded.safetensors"), "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    out, err = capsys.readouterr()
    assert code == 1 and "serving" not in out
    assert err.startswith("error: Serve: --port must be free on '127.0.0.1'; got ") and err.count("\n") == 1
