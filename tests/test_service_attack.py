"""The service under attack, over loopback only: ``metafit serve`` in a subprocess on 127.0.0.1
(so its memory can be read from /proc), hit by requests of many huge-when-decoded images while
16 clients keep predicting. Bounded: a few seconds of work on 2 cores."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import write_image_tree  # noqa: E402
from test_serve import _checkpoint, _files  # noqa: E402

from metafit.data import list_labelled_images  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads memory from /proc")

MEMORY_CEILING_KB = 1024 * 1024  # 1 GiB
CLIENTS, REQUESTS = 16, 50
CLI = [sys.executable, "-c", "from metafit.cli.main import entrypoint; entrypoint()"]


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """``metafit serve`` of a tiny checkpoint in a subprocess: (process, base URL, checkpoint, folder)."""
    tmp = tmp_path_factory.mktemp("attack")
    ckpt = _checkpoint(tmp)
    port = _free_port()
    log = open(tmp / "server.log", "wb")  # a file, not a pipe: a chatty server never blocks on it
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a 2-core machine, shared
    proc = subprocess.Popen(CLI + ["serve", str(ckpt), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"server exited: {(tmp / 'server.log').read_text()}"
        assert time.monotonic() < deadline, "server did not start within 90 s"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    try:
        yield proc, url, ckpt, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _black_png(size: int = 4096) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "PNG")
    return buf.getvalue()


def test_concurrent_decompression_attack_stays_bounded_while_clients_are_served(service):
    proc, url, _, tmp = service
    files, labels = list_labelled_images(write_image_tree(tmp / "support", n_classes=5, per_class=1, size=20))
    with httpx.Client(base_url=url, timeout=60) as c:
        task_id = c.post("/tasks", files=_files(files), data={"labels": labels}).json()["task_id"]
    big = _black_png()
    assert len(big) < 100_000  # 40 of them: a ~2 MB request, ~2.7 GB once decoded
    start_rss, _ = _memory_kb(proc.pid)

    clients_started = threading.Barrier(CLIENTS + 1, timeout=120)

    def client(k: int) -> int:
        errors = 0
        with httpx.Client(base_url=url, timeout=120) as c:
            clients_started.wait()
            for i in range(REQUESTS):
                j = (k + i) % len(files)
                try:
                    r = c.post(f"/tasks/{task_id}/predict", files=_files([files[j]]))
                    errors += r.status_code != 200 or r.json()["predictions"][0]["label"] != labels[j]
                except httpx.HTTPError:
                    errors += 1
        return errors

    def attack(n_images: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=120) as c:
            return c.post("/tasks", files=[("images", (f"black{i}.png", big, "image/png")) for i in range(n_images)],
                          data={"labels": ["a", "b"] * (n_images // 2)})

    peak_rss = 0
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS + 8) as pool:
        served = [pool.submit(client, k) for k in range(CLIENTS)]
        clients_started.wait()
        # four requests of 40 images (refused from their headers: 413), and four of 4 images that are
        # accepted and decoded one at a time under the shared decoding budget
        attacks = [pool.submit(attack, 40) for _ in range(4)] + [pool.submit(attack, 4) for _ in range(4)]
        while not all(f.done() for f in served + attacks):
            peak_rss = max(peak_rss, _memory_kb(proc.pid)[0])
            time.sleep(0.01)
        errors = sum(f.result() for f in served)
    elapsed = time.monotonic() - t0
    rss, hwm = _memory_kb(proc.pid)
    refused, accepted = [f.result() for f in attacks[:4]], [f.result() for f in attacks[4:]]

    for r in refused:
        assert r.status_code == 413, r.text
        assert r.json()["error"].startswith("Serve: the images of a request must decode to at most 1073741824 bytes "
                                            "together; got 2684354560 bytes from 40 images.")
    for r in accepted:
        assert r.status_code == 201 and r.json()["n_support"] == 4, r.text
    assert errors == 0, f"{errors} of {CLIENTS * REQUESTS} requests failed during the attack"
    assert hwm < MEMORY_CEILING_KB, f"server peaked at {hwm / 1024:.0f} MiB"
    # decoded images are given back: the server holds little more than before the attack
    assert rss < start_rss + 150 * 1024, \
        f"server holds {rss / 1024:.0f} MiB after the attack (was {start_rss / 1024:.0f})"

    assert proc.poll() is None
    with httpx.Client(base_url=url, timeout=10) as c:
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            assert c.get("/health").json() == {"status": "ok"}
            latencies.append(time.perf_counter() - t)
    assert min(latencies) < 0.1, f"/health took {min(latencies) * 1000:.0f} ms at best"
    print(f"\n{CLIENTS}x{REQUESTS} requests + attack: {elapsed:.1f} s, {errors} errors; server RSS "
          f"{start_rss / 1024:.0f} MiB before, peak {max(hwm, peak_rss) / 1024:.0f} MiB, {rss / 1024:.0f} MiB after; "
          f"/health {min(latencies) * 1000:.1f} ms")


def test_serve_on_the_port_of_a_running_server_says_so(service):
    _, url, ckpt, _ = service
    port = url.rsplit(":", 1)[1]
    done = subprocess.run(CLI + ["serve", str(ckpt), "--port", port], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "serving" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: Serve: --port must be free on '127.0.0.1'; got {port}, which another process is "
                     "using. Stop that process or pass another --port."]
