"""``metafit`` command line: train, eval, adapt, predict, export, serve, tune, report, info, configs, rl, quickstart.

Errors of metafit print as one line on stderr with exit code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .. import __version__
from ..errors import MetafitError, short_repr
from ..plugins import load_plugins
from .model_commands import (_cmd_adapt, _cmd_calibrate, _cmd_configs, _cmd_ensemble, _cmd_export, _cmd_info,
                             _cmd_predict, _cmd_serve)
from .train_commands import _cmd_eval, _cmd_quickstart, _cmd_report, _cmd_rl, _cmd_train, _cmd_tune

__all__ = ["build_parser", "entrypoint", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with metafit's error shape: one line on stderr, exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(1, f"error: {self.prog}: {message}. Run '{self.prog} --help' for the usage.\n")


def _add_training_commands(sub) -> None:
    """The parsers of train, eval, tune and report: runs and their results."""
    t = sub.add_parser("train", help="meta-train from a YAML config (or a built-in config name)")
    t.add_argument("config", help="YAML file or built-in name (see `metafit configs`)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.meta_lr=0.0005 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue exactly from <out_dir>/last.safetensors (or the given checkpoint)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in a run folder that is not empty (its checkpoints, logs and report are "
                        "deleted first; without --resume or --overwrite such a folder is refused)")
    t.add_argument("--data-dir", help="dataset folder (sets data.root)")
    t.add_argument("--out-dir", help="run folder (sets out_dir)")
    t.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    t.add_argument("--check", action="store_true",
                   help="validate the config and size the model, then stop (nothing is read, trained or written)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on fixed episodes (mean and 95%% CI)")
    e.add_argument("checkpoint")
    e.add_argument("--ways", type=int, help="classes per task (default: the checkpoint's eval.n_ways)")
    e.add_argument("--shots", type=int, help="support examples per class")
    e.add_argument("--queries", type=int, help="query examples per class")
    e.add_argument("--episodes", type=int, help="number of fixed episodes (default: eval.val_episodes with --split val, "
                   "else eval.test_episodes)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--inner-steps", type=int, help="adaptation steps of a gradient-based learner (default: its eval_inner_steps)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE",
                   help="change an adaptation field for this evaluation (e.g. algorithm.head=centroid)")
    e.add_argument("--within-group", action="store_true", help="draw every task from one group (alphabet)")
    e.add_argument("--rotations", choices=["on", "off"], help="rotated classes in episodes (default: as trained)")
    e.add_argument("--seed", type=int, help="episode seed (default: the trainer's test seed)")
    e.add_argument("--data-dir", help="dataset folder, if it moved since training")
    e.add_argument("--data", metavar="SOURCE", help="evaluate on another dataset (cross-domain): folder:PATH (every "
                   "class a test class unless PATH has train/val/test), or a built-in source NAME or NAME:PATH")
    e.add_argument("--polarity", choices=["auto", "as_trained", "flip"], default="auto", help="with --data: image polarity (auto: "
                   "flip images whose border shows the opposite polarity to the training images')")
    e.add_argument("--runs", metavar="DIR", help="evaluate on Lake's one-shot runs folder instead")
    e.add_argument("--json", metavar="PATH", help="also write the report to this JSON file")
    e.add_argument("--plots", metavar="DIR", help="also draw DIR/confusion.png (by class) and DIR/episodes.png (example episodes)")
    e.add_argument("--device", default="cpu")

    tu = sub.add_parser("tune", help="hyperparameter search with Optuna (TPE sampler, median pruner); resumable",
                        description="Search config fields: every trial trains CONFIG with sampled values into "
                                    "OUT/trial-<n>; unpromising trials are pruned at validations. Running the same "
                                    "command again resumes the study; --storage shares it between machines.")
    tu.add_argument("config", help="YAML file or built-in name (see `metafit configs`)")
    tu.add_argument("--space", required=True, metavar="SPACE",
                    help="YAML mapping config fields to distributions, e.g. 'train.meta_lr: {type: float, low: 1.0e-4, "
                         "high: 1.0e-2, log: true}' (or a built-in space name)")
    tu.add_argument("--trials", type=int, required=True, metavar="N",
                    help="finished (complete + pruned) trials the study should hold in total; a resumed study runs "
                         "only the missing ones")
    tu.add_argument("--storage", metavar="URL", help="database URL of the study (default sqlite:///OUT/study.db); "
                                                     "e.g. postgresql://user@host/db to share it between machines")
    tu.add_argument("--study-name", metavar="NAME", help="study name in the storage (default: the config's name)")
    tu.add_argument("--out", metavar="DIR", help="output folder (default runs/tune-<config name>)")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="fixed config value for every trial, e.g. --set train.meta_steps=2000 (repeatable)")
    tu.add_argument("--data-dir", help="dataset folder (sets data.root)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the sampler (use a different one on each machine "
                                                         "sharing a study)")

    rp = sub.add_parser("report", help="Markdown table and learning curves (PNG) of one or several run folders")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the out_dir of `metafit train`)")
    rp.add_argument("--out", metavar="DIR", help="where report.md and curves.png go (default: <parent of the "
                                                 "first run>/report)")
    rp.add_argument("--metric", choices=["accuracy", "loss"], default="accuracy",
                    help="curves of the task metric (accuracy, or MSE for regression) or of the loss")
    rp.add_argument("--x", choices=["time", "images"], default="time",
                    help="x-axis of the curves: training time (default) or training images seen (a step is one "
                         "episode for ProtoNet but a mini-batch for transfer, so steps are not compared)")


def _add_model_commands(sub) -> None:
    """The parsers of adapt, predict, export, calibrate, serve and info: putting a checkpoint to work."""
    a = sub.add_parser("adapt", help="adapt a trained model to your labelled images; save the task")
    a.add_argument("checkpoint")
    a.add_argument("--support", required=True, metavar="DIR", help="support images, one folder per label: DIR/<label>/<image>")
    a.add_argument("--out", required=True, metavar="TASK", help="where to save the adapted task (.safetensors)")
    a.add_argument("--steps", type=int, help="adaptation steps of a gradient-based learner")
    a.add_argument("--polarity", choices=["auto", "as_trained", "flip"], default="auto", help="image polarity: auto (flip images "
                   "whose border shows the opposite polarity to the training images'), as_trained or flip")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="change an adaptation-only algorithm field, e.g. algorithm.finetune_steps=20 (repeatable)")
    a.add_argument("--device", default="cpu")

    pr = sub.add_parser("predict", help="predict labels of images with an adapted task (or checkpoint + --support)")
    pr.add_argument("model", metavar="CHECKPOINT|TASK", help="a saved task, or a checkpoint together with --support")
    pr.add_argument("--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    pr.add_argument("--support", metavar="DIR", help="with a checkpoint: support images, DIR/<label>/<image>")
    pr.add_argument("--steps", type=int, help="with a checkpoint: adaptation steps of a gradient-based learner")
    pr.add_argument("--polarity", choices=["auto", "as_trained", "flip"], help="image polarity: auto, as_trained or flip "
                    "(default: the task's own; with a checkpoint, auto)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="change an adaptation-only algorithm field, e.g. algorithm.finetune_steps=20 (repeatable)")
    pr.add_argument("--out", metavar="FILE", help="write .csv or .json (default: CSV on standard output)")
    pr.add_argument("--top-k", type=int, default=3, help="most probable labels listed per image")
    pr.add_argument("--abstain-below", type=float, metavar="P",
                    help="answer 'unknown' where the top probability is below P (0 < P <= 1)")
    pr.add_argument("--batch-size", type=int, default=256, help="images converted and predicted at a time")
    pr.add_argument("--device", default="cpu")

    ex = sub.add_parser("export", help="write an adapted task (or checkpoint + --support) as one ONNX graph")
    ex.add_argument("model", metavar="TASK|CHECKPOINT", help="a saved task, or a checkpoint together with --support")
    ex.add_argument("--out", required=True, metavar="FILE", help="where to write the graph (e.g. task.onnx)")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    ex.add_argument("--support", metavar="DIR", help="with a checkpoint: support images, DIR/<label>/<image>")
    ex.add_argument("--steps", type=int, help="with a checkpoint: adaptation steps of a gradient-based learner")
    ex.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="with a checkpoint: change an adaptation-only algorithm field (repeatable)")
    ex.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")

    cb = sub.add_parser("calibrate", help="fit a softmax temperature on validation episodes; store it in the checkpoint")
    cb.add_argument("checkpoint")
    cb.add_argument("--episodes", type=int, help="validation episodes (default: the checkpoint's eval.val_episodes)")
    cb.add_argument("--ways", type=int, help="classes per task (default: the checkpoint's eval.n_ways)")
    cb.add_argument("--shots", type=int, help="support examples per class")
    cb.add_argument("--out", metavar="PATH", help="write a calibrated copy instead of updating the checkpoint")
    cb.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="calibrate with an adaptation-only algorithm field changed, e.g. algorithm.transductive_steps=5 (repeatable; needs --out: the copy keeps the change)")
    cb.add_argument("--data-dir", help="dataset folder, if it moved since training")
    cb.add_argument("--device", default="cpu")

    en = sub.add_parser("ensemble", help="combine checkpoints (e.g. one config, several seeds) into one ensemble checkpoint")
    en.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="two to 16 checkpoints of one learner")
    en.add_argument("--out", required=True, metavar="FILE", help="where to write the ensemble (e.g. ensemble.safetensors)")

    sv = sub.add_parser("serve", help="serve a checkpoint over HTTP: create tasks, predict (FastAPI)")
    sv.add_argument("checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-tasks", type=int, default=64, help="adapted tasks kept (least recently used evicted)")
    sv.add_argument("--max-images", type=int, default=256, help="images per request")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit")
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image (width x height)")
    sv.add_argument("--max-request-decoded-mb", type=float, default=1024.0,
                    help="decoded image bytes one request may need (checked from the image headers: 413 beyond)")
    sv.add_argument("--max-decoding-mb", type=float, default=256.0,
                    help="decoded image bytes held at once by all requests being decoded")
    sv.add_argument("--api-key-env", default="METAFIT_API_KEY", metavar="VAR",
                    help="environment variable holding the API key (requests must send it when it is set)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level; info prints an access log line per request")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="change an adaptation-only algorithm field, e.g. algorithm.finetune_steps=20 (repeatable)")

    i = sub.add_parser("info", help="show what a checkpoint holds")
    i.add_argument("checkpoint")


def _add_other_commands(sub) -> None:
    """The parsers of configs, rl (train / eval / configs) and quickstart."""
    c = sub.add_parser("configs", help="list the built-in configs, or every config field with --fields")
    c.add_argument("--fields", nargs="?", const="", default=None, metavar="NAME",
                   help="list every config key with its default and meaning, grouped by section and by algorithm, "
                        "backbone and data source; with NAME (e.g. maml, resnet12, folder, train) only that one")

    rl = sub.add_parser("rl", help="meta-reinforcement learning: train / eval / configs (RL2, MAML-RL)")
    rsub = rl.add_subparsers(dest="rl_command", required=True, metavar="RL_COMMAND")
    rt = rsub.add_parser("train", help="train a meta-RL learner from a YAML config (or a built-in name)")
    rt.add_argument("config", help="YAML file or built-in name (see `metafit rl configs`)")
    rt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.iterations=200 (repeatable)")
    rt.add_argument("--resume", action="store_true", help="continue exactly from <out_dir>/last.safetensors")
    rt.add_argument("--overwrite", action="store_true",
                    help="replace the run in out_dir (its checkpoints, logs and report are deleted first)")
    rt.add_argument("--out-dir", help="run folder (sets out_dir)")
    rt.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    re_ = rsub.add_parser("eval", help="returns per adaptation step (mean and 95%% CI) on fixed test tasks")
    re_.add_argument("checkpoint")
    re_.add_argument("--tasks", type=int, help="test tasks (default: the run's train.test_tasks)")
    re_.add_argument("--seed", type=int, help="seed of the test tasks (default: the run's eval_seed + 1)")
    re_.add_argument("--out", help="also write the result as JSON here")
    re_.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                     help="where to run the evaluation (RL2: cpu or cuda; default cpu)")
    rsub.add_parser("configs", help="list the built-in meta-RL configs")

    q = sub.add_parser("quickstart", help="a short real run: MAML on sinusoids (built in), or ProtoNet on Omniglot")
    q.add_argument("--task", choices=["auto", "sinusoid", "omniglot"], default="auto",
                   help="auto: Omniglot when a data folder is given (--data-dir, METAFIT_DATA_DIR, --download) "
                        "or already cached, else sinusoids")
    q.add_argument("--data-dir", help="folder with the Omniglot zips (default: METAFIT_DATA_DIR)")
    q.add_argument("--download", action="store_true", help="download Omniglot (checksum-verified) if missing")
    q.add_argument("--steps", type=int, help="meta-training steps (default: sinusoid 10000, omniglot 500)")
    q.add_argument("--out-dir", help="run folder (default runs/quickstart-<task>)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metafit", description="Practical meta-learning: train, evaluate, adapt.")
    p.add_argument("--version", action="version", version=f"metafit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_other_commands(sub)
    return p


COMMANDS = {"rl": _cmd_rl, "train": _cmd_train, "eval": _cmd_eval, "adapt": _cmd_adapt, "predict": _cmd_predict,
            "calibrate": _cmd_calibrate, "serve": _cmd_serve, "tune": _cmd_tune, "report": _cmd_report,
            "info": _cmd_info, "configs": _cmd_configs, "quickstart": _cmd_quickstart,
            "export": _cmd_export, "ensemble": _cmd_ensemble}


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from PIL import Image

    # metafit refuses oversized images with its own one-line error (data.decode.open_image); Pillow's
    # warning for images between its two thresholds would print a second line
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (1, one line printed)
        return done.code if isinstance(done.code, int) else 1
    try:
        load_plugins()  # modules named in METAFIT_PLUGINS and installed metafit.plugins entry points
        return COMMANDS[args.command](args)
    except MetafitError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except BrokenPipeError:  # the reader went away (e.g. `metafit configs --fields | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit-time flush does not fail again
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as err:  # a path that cannot be read or written: name it
        if args.debug:
            raise
        what = f" {short_repr(os.fsdecode(err.filename))}" if err.filename is not None else ""
        print(f"error: cannot use{what}: {err.strerror or err}. Check the path, its permissions and the free disk space.",
              file=sys.stderr, flush=True)
        return 1
    except MemoryError:
        if args.debug:
            raise
        print("error: out of memory. Use smaller tasks, batches, images or a smaller model.", file=sys.stderr, flush=True)
        return 1
    except Exception as err:  # noqa: BLE001 - the last resort keeps the promise of one line
        if args.debug:
            raise
        text = " ".join(str(err).split())
        print(f"error: unexpected {type(err).__name__}: {text[:300]}. This is a bug in metafit: rerun with --debug for "
              "the traceback and report it.", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (resume with --resume)", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())
