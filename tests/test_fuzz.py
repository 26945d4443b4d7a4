"""Fuzzing the inputs a user controls — config files, ``--set`` values, command lines, checkpoint and
task metadata — with Hypothesis (fixed seed). Every generated case must end with exit code 0 (a
valid input) or 1 and exactly one ``error:`` line on stderr: no traceback, no "bug" fallback. The
cases run in a child process under a 3 GiB address-space limit and a hang guard, so a
blow-up fails the test instead of the machine.

``METAFIT_FUZZ_EXAMPLES`` sets the cases per target (default 500); ``benchmarks/reliability.py`` runs
a longer campaign and prints the table of the docs' Reliability section.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

INNER = os.environ.get("METAFIT_FUZZ_INNER") == "1"
EXAMPLES = int(os.environ.get("METAFIT_FUZZ_EXAMPLES", "500"))
MEMORY_LIMIT = 3 * 2**30
TARGETS = ("config_file", "override", "argv", "checkpoint_meta", "task_meta")


def test_fuzz_targets_under_resource_limits(tmp_path):
    """Run every target's cases in a child process limited to 3 GiB of address space."""
    def limit():  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    summary = tmp_path / "summary.jsonl"
    env = {**os.environ, "METAFIT_FUZZ_INNER": "1", "METAFIT_FUZZ_SUMMARY": str(summary)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "inner"],
        cwd=Path(__file__).parent, env=env, preexec_fn=limit, capture_output=True, text=True,
        timeout=60 * 30,  # a hang guard (the run takes ~1-2 minutes), not a speed assertion
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in summary.read_text().splitlines()]
    assert {r["target"] for r in rows} == set(TARGETS)
    for row in rows:
        assert row["cases"] >= EXAMPLES and row["clean_errors"] + row["accepted"] == row["cases"], row
        assert row["clean_errors"] > 0, row  # the generators do reach the validation


# ---------------------------------------------------------------------------------------------
# the cases (run only inside the limited child process)

if INNER:
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from safetensors import safe_open
    from safetensors.torch import save_file

    from conftest import tiny_config, write_image_tree
    from metafit.cli import main
    from metafit.cli.main import build_parser
    from metafit.training import builtin_configs

    # fixed seed in the test run; METAFIT_FUZZ_RANDOM=1 (the longer campaign) draws new cases each time
    FUZZ = settings(max_examples=EXAMPLES, derandomize=os.environ.get("METAFIT_FUZZ_RANDOM") != "1",
                    deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    OUTCOMES: dict[str, Counter] = {}

    def run_cli(target: str, argv: list[str]) -> None:
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
        text = err.getvalue()
        counts = OUTCOMES.setdefault(target, Counter())
        counts["cases"] += 1
        if rc == 0:
            counts["accepted"] += 1
            return
        lines = text.splitlines()
        assert rc == 1, (argv, rc, text[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, text[-2000:])
        assert "This is a bug" not in text and "Traceback" not in text, (argv, text)
        counts["clean_errors"] += 1

    @pytest.fixture(scope="module", autouse=True)
    def _write_summary():
        yield
        with open(os.environ["METAFIT_FUZZ_SUMMARY"], "a") as f:
            for target, c in OUTCOMES.items():
                f.write(json.dumps({"target": target, "cases": c["cases"], "accepted": c["accepted"],
                                    "clean_errors": c["clean_errors"]}) + "\n")

    # -- values -----------------------------------------------------------------------------
    NAMES = ["maml", "anil", "protonet", "svm", "ridge", "transfer", "reptile", "metasgd", "conv4", "mlp",
             "resnet12", "hf", "omniglot", "folder", "sinusoid", "tiny_imagenet", "cub", "adam", "cosine", "auto"]
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 3000),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(NAMES),
    )
    values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)

    def alias_bomb(levels: int, width: int) -> str:
        parts = ["&a0 [" + ",".join(["x"] * width) + "]"]
        parts += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
        return "[" + ", ".join(parts) + "]"

    HOSTILE_TEXT = [alias_bomb(9, 9), "[" * 10_000, "[" * 5000 + "]" * 5000, "{a: 1, a: 2}", "!!python/object/apply:os.system [id]",
                    "!!binary AAAA", "*undefined", "&x", "- - -", "{", "'unterminated", "\t", "1e9", "0x10", "~", ".inf",
                    "18446744073709551616", "-1", "[1, [2, [3]]]", "{name: maml, inner_lr: .nan}"]
    raw_values = st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n").strip()),
                           st.sampled_from(HOSTILE_TEXT), st.text(max_size=30))

    BASES = {name: yaml.safe_load(path.read_text()) for name, path in builtin_configs().items()}

    def paths(tree: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in tree.items():
            out.append(prefix + str(k))
            if isinstance(v, dict):
                out += paths(v, prefix + str(k) + ".")
        return out

    KEYS = sorted({p for cfg in BASES.values() for p in paths(cfg)})

    def set_path(tree: dict, dotted: str, value) -> None:
        node = tree
        parts = dotted.split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[parts[-1]] = value

    def delete_path(tree: dict, dotted: str) -> None:
        """Remove ``tree['a']['b']`` for ``dotted='a.b'`` where it exists."""
        parent, _, last = dotted.rpartition(".")
        node = tree
        for p in parent.split(".") if parent else []:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)

    @st.composite
    def config_documents(draw) -> bytes:
        base = json.loads(json.dumps(BASES[draw(st.sampled_from(sorted(BASES)))]))
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["set", "set", "set", "section", "junk", "delete"]))
            key = draw(st.sampled_from(KEYS))
            if kind == "set":
                set_path(base, key, draw(values))
            elif kind == "section":
                base[key.split(".")[0]] = draw(values)
            elif kind == "junk":
                set_path(base, key.rsplit(".", 1)[0] + "." + draw(st.text(min_size=1, max_size=8)), draw(values))
            else:
                delete_path(base, key)
        text = yaml.safe_dump(base, allow_unicode=True)
        raw = draw(st.sampled_from(["plain", "plain", "plain", "prefix", "bytes", "duplicate"]))
        if raw == "prefix":
            text = f"zz: {draw(st.sampled_from(HOSTILE_TEXT))}\n" + text
        elif raw == "duplicate":
            text += text.splitlines()[0] + "\n"
        data = text.encode()
        if raw == "bytes":
            pos = draw(st.integers(0, len(data)))
            data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
        return data

    def test_inner_config_files(tmp_path_factory):
        folder = tmp_path_factory.mktemp("cfg")

        @FUZZ
        @given(config_documents())
        def case(data):
            path = folder / "c.yaml"
            path.write_bytes(data)
            run_cli("config_file", ["train", str(path), "--check"])

        case()

    def test_inner_overrides():
        @FUZZ
        @given(st.sampled_from(sorted(BASES)), st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), raw_values)
        def case(base, key, raw):
            run_cli("override", ["train", base, "--check", "--set", f"{key}={raw}"])

        case()

    # -- command lines ----------------------------------------------------------------------
    def subcommand_flags() -> dict[tuple[str, ...], list[str]]:
        parser = build_parser()
        found: dict[tuple[str, ...], list[str]] = {}

        def walk(p, prefix):
            for action in p._actions:
                if action.__class__.__name__ == "_SubParsersAction":
                    for name, sub in action.choices.items():
                        walk(sub, prefix + (name,))
            found[prefix] = sorted(s for a in p._actions for s in a.option_strings if s.startswith("--"))

        walk(parser, ())
        return found

    # commands that would start a server, a search or a long run when their arguments are valid
    UNSAFE = {("serve",), ("tune",), ("quickstart",), ("rl", "train"), ("train",)}
    COMMANDS = {k: v for k, v in subcommand_flags().items() if k and k not in UNSAFE and k != ("rl",)}

    @pytest.fixture(scope="module")
    def hostile_files(tmp_path_factory):
        root = tmp_path_factory.mktemp("hostile")
        (root / "garbage.safetensors").write_bytes(os.urandom(256))
        (root / "empty.safetensors").write_bytes(b"")
        (root / "huge_header.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
        (root / "dir.safetensors").mkdir()
        (root / "loop").symlink_to(root / "loop")
        (root / "text.yaml").write_text("a: [1\n")
        write_image_tree(root / "images", n_classes=2, per_class=1, size=8)
        return [str(root / n) for n in ("garbage.safetensors", "empty.safetensors", "huge_header.safetensors",
                                         "dir.safetensors", "loop", "text.yaml", "images", "missing.safetensors")]

    TOKENS = ["-1", "0", "1", "18446744073709551616", "nan", "x", "", "/proc/x", "/dev/null", "--", "-",
              "algorithm.head=centroid", "algorithm.x=[1", "train.meta_lr=.inf", "val", "test", "on", "cpu", "cuda:9"]

    @st.composite
    def argvs(draw, files):
        command = draw(st.sampled_from(sorted(COMMANDS)))
        argv = list(command)
        if command[-1] in ("eval", "adapt", "predict", "calibrate", "info", "report"):
            argv.append(draw(st.sampled_from(files)))
        for _ in range(draw(st.integers(0, 4))):
            flag = draw(st.sampled_from(COMMANDS[command] or ["--help"]))
            if flag in ("--help", "--version"):
                continue
            argv.append(flag)
            if draw(st.booleans()):
                argv.append(draw(st.one_of(st.sampled_from(TOKENS + files), st.text(max_size=8))))
        return argv

    def test_inner_argv(hostile_files):
        @FUZZ
        @given(argvs(hostile_files))
        def case(argv):
            run_cli("argv", argv)

        case()

    # -- checkpoint and task metadata -------------------------------------------------------
    @pytest.fixture(scope="module")
    def trained(tmp_path_factory):
        root = tmp_path_factory.mktemp("trained")
        data = write_image_tree(root / "data", n_classes=8, per_class=4, size=16)
        cfg = tiny_config(root / "run", data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25})
        cfg["task"]["n_ways"] = cfg["eval"]["n_ways"] = 2
        cfg["eval"].update(val_episodes=2, test_episodes=2)
        cfg["train"].update(meta_steps=2, eval_every=2, tensorboard=False)
        (root / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(root / "c.yaml"), "--no-test"]) == 0
        ckpt = root / "run" / "best.safetensors"
        support = write_image_tree(root / "support", n_classes=2, per_class=1, size=16)
        task = root / "task.safetensors"
        assert main(["adapt", str(ckpt), "--support", str(support), "--out", str(task)]) == 0
        return root, ckpt, task, support

    def read(path: Path):
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}

    @st.composite
    def mutated_meta(draw, meta: dict):
        meta = json.loads(json.dumps(meta))
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(paths(meta)))
            kind = draw(st.sampled_from(["set", "set", "delete", "deep"]))
            if kind == "set":
                set_path(meta, key, draw(values))
            elif kind == "deep":
                depth = draw(st.integers(30, 3000))
                set_path(meta, key, json.loads("[" * depth + "]" * depth) if depth < 900 else None)
            else:
                delete_path(meta, key)
        text = json.dumps(meta)
        if draw(st.integers(0, 9)) == 0:  # nesting no JSON library object can hold
            text = "[" * 100_000 + "]" * 100_000
        return text

    def test_inner_checkpoint_meta(trained, tmp_path_factory):
        _, ckpt, _, _ = trained
        meta, tensors = read(ckpt)
        base = json.loads(meta["metafit"])
        folder = tmp_path_factory.mktemp("ckpt")

        @FUZZ
        @given(mutated_meta(base), st.sampled_from(["info", "eval"]))
        def case(text, command):
            path = folder / "m.safetensors"
            save_file(tensors, str(path), metadata={**meta, "metafit": text})
            run_cli("checkpoint_meta", [command, str(path)] + (["--episodes", "1"] if command == "eval" else []))

        case()

    def test_inner_task_meta(trained, tmp_path_factory):
        _, _, task, support = trained
        meta, tensors = read(task)
        key = next(iter(meta))
        base = json.loads(meta[key])
        folder = tmp_path_factory.mktemp("task")

        @FUZZ
        @given(mutated_meta(base))
        def case(text):
            path = folder / "t.safetensors"
            save_file(tensors, str(path), metadata={**meta, key: text})
            run_cli("task_meta", ["predict", str(path), "--images", str(support)])

        case()
