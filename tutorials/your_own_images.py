# %% [markdown]
# # Your own images: train, evaluate, adapt, predict, serve
#
# A few-shot classifier for a folder of your own labelled images, end to end, with metafit's
# Python API (each step's command-line twin is in the comments). So that this tutorial runs
# anywhere, its "own images" are generated: small colour pictures of 24 shape-and-colour classes.
# Point `DATA` at your folder (`root/<class>/<image>`) to use yours.
#
# Run it as a script (`python tutorials/your_own_images.py`) or open it as a notebook with
# jupytext. `METAFIT_TUTORIAL_QUICK=1` shrinks every budget (the test suite runs it that way).

# %%
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import metafit
from metafit.training import evaluate_checkpoint, make_config, train

QUICK = os.environ.get("METAFIT_TUTORIAL_QUICK") == "1"
WORK = Path(os.environ.get("METAFIT_TUTORIAL_DIR") or tempfile.mkdtemp(prefix="metafit-tutorial-"))
DATA = WORK / "shapes"

# %% [markdown]
# ## 1. Images: one folder per class
# Each class is a shape in a colour; its images vary in position, size and background noise.

# %%
SHAPES = ["circle", "square", "triangle", "cross", "bar", "ring"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "orange": (240, 150, 20)}


def draw(shape: str, colour: tuple, rng: np.random.Generator, size: int = 32) -> Image.Image:
    background = rng.integers(200, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(background)
    d = ImageDraw.Draw(im)
    r = rng.integers(7, 12)
    cx, cy = rng.integers(r + 1, size - r - 1, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        d.rectangle([cx - r, cy - 2, cx + r, cy + 2], fill=colour)
        d.rectangle([cx - 2, cy - r, cx + 2, cy + r], fill=colour)
    elif shape == "bar":
        d.rectangle([cx - r, cy - 3, cx + r, cy + 3], fill=colour)
    else:
        d.ellipse(box, outline=colour, width=3)
    return im


rng = np.random.default_rng(0)
per_class = 12 if QUICK else 30
for shape in SHAPES:
    for name, colour in COLOURS.items():
        folder = DATA / f"{name}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(shape, colour, rng).save(folder / f"{i:03d}.png")
print(f"{len(SHAPES) * len(COLOURS)} classes x {per_class} images in {DATA}")

# %% [markdown]
# ## 2. Train
# Prototypical Networks on 5-way 1-shot tasks. The classes are split at random into train /
# validation / test classes (printed at the start, saved as `split.json`): the test classes are
# never seen in training. Command line: `metafit train config.yaml` with the same settings as YAML.

# %%
config = make_config({
    "out_dir": str(WORK / "run"),
    "data": {"name": "folder", "root": str(DATA), "image_size": 32, "channels": 3,
             "val_fraction": 0.25, "test_fraction": 0.25},
    "task": {"n_ways": 5, "k_shots": 1, "n_queries": 5},
    "eval": {"n_ways": 5, "k_shots": 1, "n_queries": 5, "val_episodes": 20 if QUICK else 100,
             "test_episodes": 50 if QUICK else 600},
    "algorithm": {"name": "protonet"},
    "backbone": {"name": "conv4", "hidden_channels": 16 if QUICK else 32},
    "augment": {"flip": True},
    "train": {"meta_steps": 30 if QUICK else 600, "eval_every": 15 if QUICK else 200,
              "save_interval": 1000, "progress": False, "tensorboard": False},
})
report = train(config, overwrite=True)
test = report["test"]
print(f"test: {100 * test['mean']:.1f}% +/- {100 * test['ci95']:.1f}% on {test['episodes']} fixed "
      f"5-way 1-shot episodes of unseen classes")

# %% [markdown]
# ## 3. Evaluate the kept checkpoint on other task shapes
# `metafit eval runs/.../best.safetensors --ways 3 --shots 5`

# %%
ckpt = report["best_checkpoint"]
r = evaluate_checkpoint(ckpt, n_ways=3, k_shots=5, episodes=20 if QUICK else 200)
print(f"3-way 5-shot: {100 * r['mean']:.1f}% +/- {100 * r['ci95']:.1f}%")

# %% [markdown]
# ## 4. Adapt to new classes from a handful of images, then predict
# Two brand-new classes (purple circles and purple squares) that training never saw, five
# images each. `metafit adapt CKPT --support DIR --out task.safetensors`, then
# `metafit predict task.safetensors --images DIR`.

# %%
purple = (130, 40, 170)
support, labels, queries, truth = [], [], [], []
for shape in ("circle", "square"):
    for i in range(10):
        path = WORK / "new" / f"purple_{shape}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(shape, purple, rng).save(path)
        (support if i < 5 else queries).append(path)
        (labels if i < 5 else truth).append(f"purple {shape}")

model = metafit.load(ckpt)
task = model.adapt(support, labels)
prediction = task.predict(queries)
correct = sum(p == t for p, t in zip(prediction.labels, truth))
print(f"{correct} of {len(truth)} new images labelled right; first: {prediction.top_k(2)[0]}")
task.save(WORK / "purple.safetensors")  # later: metafit.load_task(...) needs no support set

# %% [markdown]
# ## 5. Serve
# `metafit serve CKPT --port 8000` runs the same model as an HTTP service. Here the app is
# exercised in-process (no port): create a task from uploaded images, then predict.

# %%
from fastapi.testclient import TestClient  # noqa: E402 - needs metafit[serve]

from metafit.serve import create_app  # noqa: E402

with TestClient(create_app(model)) as client:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in support]
    created = client.post("/tasks", files=files, data={"labels": labels}).json()
    answer = client.post(f"/tasks/{created['task_id']}/predict",
                         files=[("images", (queries[0].name, queries[0].read_bytes(), "image/png"))]).json()
print("service:", created["class_names"], "->", answer["predictions"][0]["label"])
