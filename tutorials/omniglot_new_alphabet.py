# %% [markdown]
# # Omniglot: a new alphabet from one example per character
#
# Meta-train on the 30 background alphabets of Omniglot (Lake et al. 2015), then meet an
# alphabet the model has never seen: show it **one drawing of each character** and ask it to
# recognise the other 19 people's drawings of them. This is the one-shot learning that Omniglot
# was made for, with metafit's Python API (command-line twins in the comments).
#
# Needs the official Omniglot zips in `METAFIT_DATA_DIR` (default `../shared/data/omniglot`), or
# set `DOWNLOAD = True` to fetch them (checksum-verified). `METAFIT_TUTORIAL_QUICK=1` shrinks the
# budgets (the test suite runs it that way); the full budget takes about 15 minutes on 2 CPU cores.

# %%
import os
import tempfile
import zipfile
from pathlib import Path

import metafit
from metafit.training import load_config, train

QUICK = os.environ.get("METAFIT_TUTORIAL_QUICK") == "1"
DOWNLOAD = False
ROOT = Path(os.environ.get("METAFIT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")
WORK = Path(os.environ.get("METAFIT_TUTORIAL_DIR") or tempfile.mkdtemp(prefix="metafit-omniglot-"))

# %% [markdown]
# ## 1. Meta-train on the background alphabets
# The built-in config `omniglot_protonet_lake` trains Prototypical Networks on the 30 background
# alphabets only (the 20 evaluation alphabets stay unseen) with 60-way 1-shot episodes.
# Command line: `metafit train omniglot_protonet_lake --data-dir DIR`.

# %%
overrides = [f"data.root={ROOT}", f"data.download={str(DOWNLOAD).lower()}", f"out_dir={WORK / 'run'}",
             "train.progress=false", "train.tensorboard=false"]
if QUICK:
    overrides += ["train.meta_steps=40", "train.eval_every=20", "task.n_ways=20", "eval.val_episodes=20",
                  "eval.test_episodes=20", "backbone.hidden_channels=16", "train.max_minutes=null"]
report = train(load_config("omniglot_protonet_lake", overrides), overwrite=True)
print(f"within-alphabet 20-way 1-shot on the evaluation alphabets: {100 * report['test']['mean']:.1f}% "
      f"+/- {100 * report['test']['ci95']:.1f}%")

# %% [markdown]
# ## 2. A new alphabet: one drawing per character
# Take one evaluation alphabet from the zip: drawer 1's image of each character is the support
# set (one example per character), the other drawers' images are the queries.

# %%
ALPHABET = "Atlantean"
support, labels, queries, truth = [], [], [], []
with zipfile.ZipFile(ROOT / "images_evaluation.zip") as z:
    names = sorted(n for n in z.namelist() if n.startswith(f"images_evaluation/{ALPHABET}/") and n.endswith(".png"))
    for name in names:
        character, file = name.split("/")[-2:]
        path = WORK / ALPHABET / character / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(z.read(name))
        drawer = int(file.split("_")[1].split(".")[0])
        if drawer == 1:
            support.append(path)
            labels.append(character)
        elif drawer <= (4 if QUICK else 20):
            queries.append(path)
            truth.append(character)
print(f"{ALPHABET}: {len(support)} characters, one example each; {len(queries)} drawings to recognise")

# %% [markdown]
# ## 3. Adapt and predict
# Command line: put the support images in `support/<character>/<image>` and run
# `metafit predict CKPT --support support --images queries/`.

# %%
model = metafit.load(report["best_checkpoint"])
task = model.adapt(support, labels)
prediction = task.predict(queries)
correct = sum(p == t for p, t in zip(prediction.labels, truth))
print(f"{correct} of {len(truth)} drawings recognised ({100 * correct / len(truth):.1f}%; chance "
      f"{100 / len(support):.1f}%), from one example per character")
print("most confident guesses for the first drawing:", prediction.top_k(3)[0])
