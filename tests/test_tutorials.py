"""The tutorials run, on small budgets (METAFIT_TUTORIAL_QUICK=1), so they never rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from conftest import OMNIGLOT_DIR

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def _run(name: str, tmp_path: Path) -> str:
    env = dict(os.environ, METAFIT_TUTORIAL_QUICK="1", METAFIT_TUTORIAL_DIR=str(tmp_path),
               METAFIT_DATA_DIR=str(OMNIGLOT_DIR))
    done = subprocess.run([sys.executable, str(TUTORIALS / name)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_your_own_images_tutorial_runs(tmp_path):
    out = _run("your_own_images.py", tmp_path)
    assert "24 classes x 12 images" in out and "fixed 5-way 1-shot episodes of unseen classes" in out
    assert "new images labelled right" in out and "service: ['purple circle', 'purple square'] ->" in out
    assert (tmp_path / "run" / "split.json").is_file() and (tmp_path / "purple.safetensors").is_file()


def test_omniglot_new_alphabet_tutorial_runs(tmp_path, omniglot_dir):
    out = _run("omniglot_new_alphabet.py", tmp_path)
    assert "Atlantean: 26 characters, one example each" in out and "drawings recognised" in out
