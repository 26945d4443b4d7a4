"""Hostile and mistaken input to configs and the command line: each probe of issue 36 gets exit
code 1 and exactly one ``error:`` line that names the problem, in bounded time and memory."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_config, write_image_tree
from metafit.cli import main
from metafit.errors import ConfigError, MAX_MESSAGE_CHARS, constraint_message, short_repr
from metafit.training import load_config, make_config
from metafit.validation import MAX_NESTING, load_json, load_yaml

QUICK = ["--check"]


def one_error_line(capsys, rc: int) -> str:
    """The single stderr line of a failed command (asserting the shape every error has)."""
    captured = capsys.readouterr()
    assert rc == 1, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and "This is a bug" not in captured.err
    return lines[0]


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The 'billion laughs' YAML value: ``width ** levels`` items from a few hundred bytes."""
    parts = ["&a0 [" + ",".join(["x"] * width) + "]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("override, expected", [
    ("algorithm=[maml]", "algorithm must be a mapping with a name"),
    ("algorithm.name=[maml]", "algorithm.name must be one of"),
    ("backbone.name={a: 1}", "backbone.name must be one of"),
    ("data.name=7", "data.name must be one of"),
    ("seed=18446744073709551616", "seed must be at most 2147483647"),
    ("eval.seed=18446744073709551616", "eval.seed must be at most"),
    ("backbone={name: mlp, hidden: [-8]}", "backbone.hidden[0] must be greater than or equal to 1"),
    ("backbone={name: mlp, hidden: [1000000000000]}", "backbone.hidden[0] must be less than or equal to 65536"),
    ("train.meta_lr=[1", "the value of --set train.meta_lr must be valid YAML; line 1, column 3"),
    ("train.meta_lr=!!python/object/apply:os.system [echo pwned]", "could not determine a constructor"),
    ("train.meta_lr=.nan", "train.meta_lr must be a finite number"),
    ("train.meta_batch_size=1000000000", "train.meta_batch_size must be less than or equal to 4096"),
    ("eval.val_episodes=1000000000", "eval.val_episodes must be less than or equal to 100000"),
    ("train.num_threads=100000", "train.num_threads must be less than or equal to 1024"),
    ("train.meta_lr=" + alias_bomb(), "aliases (*name) are not accepted"),
    ("train.meta_lr=" + "[" * 10_000 + "]" * 10_000, f"nesting deeper than {MAX_NESTING} levels"),
    ("train.meta_lr.x=1", "train.meta_lr must be a section"),
    ("a..b=1", "override key must be dotted names"),
])
def test_bad_overrides_get_one_line(capsys, override, expected):
    line = one_error_line(capsys, main(["train", "sinusoid_maml", *QUICK, "--set", override]))
    assert expected in line
    assert len(line) <= MAX_MESSAGE_CHARS + len("error: ")


def test_bare_names_select_a_section(capsys):
    assert main(["train", "sinusoid_maml", *QUICK, "--set", "algorithm=maml", "--set", "backbone=mlp"]) == 0
    assert "config OK: maml on sinusoid data, mlp backbone" in capsys.readouterr().out
    assert make_config({"algorithm": "anil"}).algorithm.name == "anil"


@pytest.mark.parametrize("text, expected", [
    ("algorithm: [maml]\n", "algorithm must be a mapping"),
    ("backbone: mlp\ndata: {name: sinusoid}\n", None),  # a bare name is a valid section
    ("train:\n  meta_lr: 0.1\n  meta_lr: 0.2\n", "line 3, column 3: duplicate key 'meta_lr'"),
    ("train:\n  meta_lr: [0.1\n", "must be valid YAML; line 3"),
    ("x: " + alias_bomb() + "\n", "aliases (*name) are not accepted"),
    (alias_bomb() + "\n", "aliases (*name) are not accepted"),
    ("[" * 10_000 + "]" * 10_000, "nesting deeper than"),
    ("- 1\n- 2\n", "must hold a mapping of sections"),
    ("seed: !!python/object/apply:os.system [echo pwned]\n", "could not determine a constructor"),
])
def test_bad_config_files_get_one_line(tmp_path, capsys, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    rc = main(["train", str(path), *QUICK])
    if expected is None:
        assert rc == 0, capsys.readouterr()
        return
    assert expected in one_error_line(capsys, rc)


def test_config_files_that_are_not_utf8_or_not_files(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"seed: 1\n\xff\xfe\x00bad")
    assert "must be UTF-8 text; got an undecodable byte at offset 8" in one_error_line(capsys, main(["train", str(path), *QUICK]))
    assert "must be a YAML file or a built-in name" in one_error_line(capsys, main(["train", str(tmp_path), *QUICK]))


def test_paths_that_cannot_be_written_are_named(tmp_path, capsys):
    rc = main(["train", "sinusoid_maml", "--set", "train.meta_steps=1", "--set", "train.progress=false",
               "--set", "out_dir=/dev/null/x"])
    assert "cannot use '/dev/null/x'" in one_error_line(capsys, rc)
    # a folder-data cache directory that is a file
    data = write_image_tree(tmp_path / "data", n_classes=8, per_class=3, size=16)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = tiny_config(tmp_path / "run", data={"root": str(data), "cache_dir": str(blocker / "sub")})
    cfg["train"]["tensorboard"] = False
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = one_error_line(capsys, main(["train", str(path), "--no-test"]))
    assert f"cannot use {str(blocker / 'sub')!r}: Not a directory" in line


@pytest.fixture(scope="module")
def sinusoid_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("sin")
    assert main(["train", "sinusoid_maml", "--out-dir", str(out), "--set", "train.meta_steps=2",
                 "--set", "train.eval_every=2", "--set", "train.progress=false", "--set", "eval.val_episodes=2",
                 "--set", "eval.test_episodes=2", "--set", "train.tensorboard=false"]) == 0
    return out / "best.safetensors"


@pytest.mark.parametrize("flags, expected", [
    (["--shots", "0"], "Eval: k_shots must be greater than or equal to 1; got 0"),
    (["--queries", "-1"], "Eval: n_queries must be greater than or equal to 1"),
    (["--episodes", "100000000000"], "Eval: episodes must be less than or equal to 100000"),
    (["--seed", "18446744073709551616"], "Eval: seed must be less than or equal to 4294967295"),
    (["--inner-steps", "-1"], "Eval: inner_steps must be greater than or equal to 0"),
    (["--ways", "x"], "metafit eval: argument --ways: invalid int value: 'x'"),
    (["--set", "algorithm.inner_lr=[1"], "must be valid YAML"),
    (["--json", "/proc/x.json"], "cannot use '/proc/x.json'"),
])
def test_eval_arguments_get_one_line(sinusoid_checkpoint, capsys, flags, expected):
    assert expected in one_error_line(capsys, main(["eval", str(sinusoid_checkpoint), *flags]))


def test_ways_below_two_and_usage_errors(tmp_path, capsys):
    data = write_image_tree(tmp_path / "data", n_classes=12, per_class=4, size=16)
    cfg = tiny_config(tmp_path / "run", data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25})
    cfg["task"]["n_ways"] = cfg["eval"]["n_ways"] = 3
    cfg["eval"].update(val_episodes=2, test_episodes=2)
    cfg["train"].update(meta_steps=2, eval_every=2, tensorboard=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-test"]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "run" / "best.safetensors"
    assert "Eval: n_ways must be greater than or equal to 2; got 1" in one_error_line(
        capsys, main(["eval", str(ckpt), "--ways", "1"]))
    support = write_image_tree(tmp_path / "support", n_classes=2, per_class=1, size=16)
    assert main(["adapt", str(ckpt), "--support", str(support), "--out", str(tmp_path / "t.safetensors")]) == 0
    capsys.readouterr()
    assert "cannot use '/proc/x.csv'" in one_error_line(
        capsys, main(["predict", str(tmp_path / "t.safetensors"), "--images", str(support), "--out", "/proc/x.csv"]))
    assert "the following arguments are required: --support" in one_error_line(capsys, main(["adapt", str(ckpt)]))
    assert "invalid choice: 'bogus'" in one_error_line(capsys, main(["bogus"]))


def test_parsers_are_bounded_and_quote_values_briefly():
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(alias_bomb(), "x")
    assert load_yaml("a: &x 1\nb: 2\n", "x") == {"a": 1, "b": 2}  # anchors alone are harmless
    with pytest.raises(ConfigError, match=f"at most {MAX_NESTING} levels"):
        load_json("[" * 100_000 + "]" * 100_000, "Checkpoint: metadata")
    with pytest.raises(ConfigError, match=f"at most {MAX_NESTING} levels"):
        load_json("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), "meta")
    assert load_json("[" * MAX_NESTING + "]" * MAX_NESTING, "meta") is not None
    nested = [1] * 10
    for _ in range(8):
        nested = [nested] * 10  # 10**9 leaves: a full repr would never finish
    assert len(short_repr(nested)) <= 120
    assert len(constraint_message("A", "b", "c", nested, "Fix it.")) < 200
    assert len(str(ConfigError("x" * 100_000))) <= MAX_MESSAGE_CHARS


def test_model_size_is_checked_before_allocating(capsys):
    rc = main(["train", "sinusoid_maml", "--set", "backbone.hidden=[65536, 65536, 65536]", "--set",
               "train.progress=false"])
    assert "the backbone must have at most 1,073,741,824 weights; got 8,590,196,736" in one_error_line(capsys, rc)
    rc = main(["train", "sinusoid_maml", *QUICK, "--set", "train.meta_batch_size=4096", "--set", "task.n_queries=100"])
    assert "a meta-batch must hold at most 262,144 examples; got 430,080 (train.meta_batch_size 4096 x (task.k_shots 5" in one_error_line(capsys, rc)
    cfg = load_config("sinusoid_maml", ["backbone.hidden=[65536, 65536, 65536]"])
    assert cfg.backbone.hidden == [65536] * 3  # valid field by field: the size rule is the model's


def test_support_folders_with_stray_sub_folders_are_named(tmp_path):
    from metafit.data import list_labelled_images
    from metafit.errors import DataError

    root = write_image_tree(tmp_path / "support", n_classes=2, per_class=1, size=8)
    (root / "class00" / "img9.png").mkdir()
    with pytest.raises(DataError, match=r"class folder .*class00' must hold image files only; got the folder .*img9.png'"):
        list_labelled_images(root)
