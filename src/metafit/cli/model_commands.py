"""Commands that put a trained model to work or describe it: adapt, predict, export, calibrate, ensemble,
serve, info, configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ConfigError, short_repr
from .common import _algorithm_overrides, _print


def _cmd_adapt(args) -> int:
    from ..data import list_labelled_images
    from ..inference import load_model

    files, labels = list_labelled_images(args.support)
    model = load_model(args.checkpoint, args.device, _algorithm_overrides(args.overrides))
    task = model.adapt(files, labels, steps=args.steps, polarity=args.polarity)
    path = task.save(args.out)
    counts = {n: labels.count(n) for n in task.class_names}
    _print(f"adapted {model.config.algorithm.name} to {task.n_classes} classes from {len(files)} images "
           f"({', '.join(f'{n}: {c}' for n, c in counts.items())}); images read as {model.image_format.describe()}")
    _print(f"{task.support_polarity.describe()}; predictions use polarity {task.polarity}")
    _print(f"task: {path}")
    return 0


def _task_or_adapted(owner: str, args, device: str, **adapt):
    """The task ``args.model`` names: a saved task as it is, or a checkpoint adapted to the labelled
    folder ``args.support`` (``adapt``: keyword arguments of ``Model.adapt``)."""
    from ..data import list_labelled_images
    from ..inference import is_task_file, load_model, load_task

    if is_task_file(args.model):
        if args.support:
            raise ConfigError(
                f"{owner}: --support must not be given with a saved task; got {args.model!r} (a task) and --support. "
                "Drop --support, or pass the checkpoint instead of the task."
            )
        return load_task(args.model, device=device)
    if not args.support:
        from ..training import read_checkpoint

        read_checkpoint(args.model)  # a missing or damaged file: say that, not "needs --support"
        raise ConfigError(
            f"{owner}: a checkpoint needs --support DIR to adapt first; got {args.model!r} without it. "
            "Pass --support, or a task saved by `metafit adapt`."
        )
    files, labels = list_labelled_images(args.support)
    model = load_model(args.model, device, _algorithm_overrides(args.overrides))
    return model.adapt(files, labels, steps=args.steps, **adapt)


def _cmd_predict(args) -> int:
    import csv
    import io

    from tqdm.auto import tqdm

    from ..data import list_images
    from ..training.metrics_log import write_json

    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError(
            f"Predict: --top-k and --batch-size must be >= 1; got {args.top_k} and {args.batch_size}. Pass positive values."
        )
    notes: list = []
    task = _task_or_adapted("Predict", args, args.device, polarity=args.polarity or "auto")
    if args.support:
        notes.append(("support", task.support_polarity))
    images = list_images(args.images)
    bar = tqdm(total=len(images), desc="predict", unit="img", dynamic_ncols=True, disable=None)
    try:
        pred = task.predict(images, batch_size=args.batch_size, progress=bar.update, abstain_below=args.abstain_below,
                            polarity=args.polarity)
    finally:
        bar.close()
    notes.append(("images", pred.polarity))
    rows = [{"file": str(f), "label": label, "probability": float(p.max()), "abstained": label is None,
             "top_k": [{"label": n, "probability": q} for n, q in top]}
            for f, label, p, top in zip(images, pred.labels, pred.probabilities, pred.top_k(args.top_k))]
    if args.out and args.out.lower().endswith(".json"):
        write_json(args.out, {"classes": list(task.class_names), "polarity": pred.polarity.to_dict(),
                              "predictions": rows})
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "label", "probability", "top_k"])  # label "unknown": abstained
        for r in rows:
            w.writerow([r["file"], "unknown" if r["abstained"] else r["label"], f"{r['probability']:.6f}",
                        ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r["top_k"])])
        if args.out:
            from ..data.cache import atomic_write_bytes

            atomic_write_bytes(Path(args.out), lambda f: f.write(buf.getvalue().encode()))
        else:
            sys.stdout.write(buf.getvalue())
    # what polarity was used, once the output is written (only for models with a polarity convention;
    # beside CSV on stdout the notes go to stderr)
    for what, use in notes:
        if use.background is not None:
            print(f"{what}: {use.describe()}", file=sys.stdout if args.out else sys.stderr, flush=True)
    if args.out:
        _print(f"{len(rows)} predictions over {task.n_classes} classes -> {args.out}")
    return 0


def _cmd_export(args) -> int:
    from ..inference.export import export_onnx, export_spec

    task = _task_or_adapted("Export", args, "cpu")
    path = export_onnx(task, args.out, opset=args.opset)
    spec = export_spec(task)
    shape = ", ".join(str(d) for d in spec["input"]["shape"])
    _print(f"exported {spec['algorithm']} task over {task.n_classes} classes {short_repr(list(task.class_names))} "
           f"-> {path}")
    _print(f"input: {spec['input']['name']} float32 [{shape}] in [0, 1] (N: any batch size)")
    _print(f"outputs: logits [N, {task.n_classes}], probabilities [N, {task.n_classes}] "
           f"(softmax(logits / {spec['temperature']:g}))")
    _print(f"preprocessing: {spec['preprocessing']}")
    if spec["batch_statistics"]:
        _print("note: BatchNorm uses the statistics of each batch (as in PyTorch): feed a task's images together")
    return 0


def _cmd_calibrate(args) -> int:
    from ..training.calibration import calibrate_checkpoint

    r = calibrate_checkpoint(args.checkpoint, episodes=args.episodes, n_ways=args.ways, k_shots=args.shots,
                             out=args.out, data_root=args.data_dir, device=args.device,
                             algorithm=_algorithm_overrides(args.overrides))
    _print(f"temperature {r['temperature']:.4f} fitted on {r['episodes']} validation episodes "
           f"({r['n_ways']}-way {r['k_shots']}-shot): ECE {100 * r['ece_before']:.2f}% -> {100 * r['ece_after']:.2f}%, "
           f"NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}")
    changed = ", ".join(f"algorithm.{k}={v}" for k, v in (r.get("algorithm_overrides") or {}).items())
    _print(f"stored in {r['checkpoint']}" + (f", which also keeps {changed}" if changed else ""))
    return 0


def _cmd_ensemble(args) -> int:
    from ..training import ensemble_checkpoints, load

    path = ensemble_checkpoints(args.checkpoints, args.out)
    model = load(path)
    members = model.run_config.backbone.member_configs()
    _print(f"ensemble of {len(members)} {model.run_config.algorithm.name} members "
           f"({', '.join(m.name for m in members)}; {model.backbone.out_features} features): {path}")
    _print(f"evaluate it with: metafit eval {path}")
    return 0


def _cmd_serve(args) -> int:
    import os

    try:
        import uvicorn

        from ..serve import ServeLimits, create_app
    except ImportError as err:
        raise ConfigError(
            f"Serve: the serve extra must be installed; got {err}. Run pip install -c constraints.txt -e \".[serve]\"."
        ) from err
    from ..inference import load_model

    for name, value in (("--port", args.port), ("--max-tasks", args.max_tasks), ("--max-images", args.max_images),
                        ("--max-body-mb", args.max_body_mb), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-request-decoded-mb", args.max_request_decoded_mb),
                        ("--max-decoding-mb", args.max_decoding_mb)):
        if value <= 0 or (name == "--port" and value > 65535):
            raise ConfigError(f"Serve: {name} must be positive (a port at most 65535); got {value}. Fix the option.")
    key = os.environ.get(args.api_key_env) or None
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_images=args.max_images,
                         max_image_pixels=args.max_image_pixels, max_tasks=args.max_tasks, api_key=key,
                         max_request_decoded_bytes=int(args.max_request_decoded_mb * 2**20),
                         max_decoding_bytes=int(args.max_decoding_mb * 2**20))
    # bind before anything is announced: a port in use is a one-line error, not a late exit 3
    import errno
    import socket

    from ..errors import short_repr

    try:
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(f"Serve: --host must be an address of this machine; got {short_repr(args.host)} ({err}). "
                          "Pass e.g. 127.0.0.1 or 0.0.0.0.") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a listener still conflicts
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"Serve: --port must be free on {short_repr(args.host)}; got {args.port}, which another process "
                              "is using. Stop that process or pass another --port.") from None
        raise ConfigError(f"Serve: --host and --port must be bindable; got {short_repr(args.host)}:{args.port} "
                          f"({err.strerror or err}). Pass another address or port.") from None
    try:
        model = load_model(args.checkpoint, args.device, _algorithm_overrides(args.overrides))
        app = create_app(model, limits)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
        _print(f"serving {model.config.algorithm.name} from {args.checkpoint} on http://{args.host}:{args.port} "
               f"(API docs at /docs; API key {'required' if key else 'off'})")
        if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            _print(f"warning: listening on {args.host} without an API key; set {args.api_key_env} to require one")
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ConfigError(f"Serve: the server must start on {args.host}:{args.port}; got a startup failure "
                          "(logged above). Fix what the log names and start it again.")
    return 0


def _short(value) -> str:
    """A config value for one line: numbers in lists rounded."""
    if isinstance(value, list):
        return "[" + ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def _info_task(path: str) -> int:
    """``metafit info`` of a task file saved by ``metafit adapt`` / ``task.save``."""
    from ..errors import CheckpointError
    from ..training.checkpoint import validate_meta
    from ..inference.task import TaskMeta, _task_raw
    from ..validation import load_json

    where = f"the metadata of {path!r}"
    meta: TaskMeta = validate_meta(TaskMeta, load_json(_task_raw(Path(path)), f"Task: {where}", CheckpointError),
                                   where, "The file is damaged or was edited; adapt again and save.", owner="Task")
    names = [str(n) for n in meta.class_names]
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    model = meta.checkpoint or "not recorded"
    if not (meta.checkpoint and Path(meta.checkpoint).is_file()):
        model += " (missing: metafit.load_task(TASK, checkpoint=PATH) takes the checkpoint it was adapted with)"
    _print(f"task         {path} (adapted by metafit adapt / task.save)")
    _print(f"algorithm    {meta.algorithm} ({meta.adapted_type})")
    _print(f"classes      {len(names)}: {shown}")
    _print(f"model        {model}")
    _print(f"metafit      {meta.metafit_version or 'unknown'} (task format {meta.format_version})")
    return 0


def _cmd_info(args) -> int:
    from ..training import read_checkpoint
    from ..training.checkpoint import load
    from ..inference import is_task_file

    if is_task_file(args.checkpoint):
        return _info_task(args.checkpoint)
    meta, tensors = read_checkpoint(args.checkpoint)  # metadata validated against the checkpoint schema
    n_params = sum(v.numel() for k, v in tensors.items() if k.startswith("model."))
    version = f"{meta.get('metafit_version') or 'unknown'} (format {meta['format_version']})"
    if meta.get("kind") == "rl":
        from ..training.rl_run import load_rl

        rl_cfg = load_rl(args.checkpoint).run_config  # the stored config and every tensor checked
        tr = rl_cfg.train
        _print(f"checkpoint   {args.checkpoint}")
        _print(f"learner      {rl_cfg.learner.name} ({json.dumps(rl_cfg.learner.model_dump(mode='json'))})")
        _print(f"family       {rl_cfg.family.name} {json.dumps(rl_cfg.family.settings)}")
        _print(f"trained for  {tr.iterations} iterations, validated on {tr.eval_tasks} tasks every {tr.eval_every}")
        _print(f"iteration    {meta['step']}   values {n_params:,} (weights and buffers)   "
               f"resumable {'train_state' in meta}")
        _print(f"metafit      {version}")
        if meta.get("metrics"):
            _print(f"metrics      {json.dumps(meta['metrics'])}")
        return 0
    run_cfg = load(args.checkpoint).run_config  # the stored config and every tensor checked
    cfg = run_cfg.to_dict()
    _print(f"checkpoint   {args.checkpoint}")
    _print(f"algorithm    {run_cfg.algorithm.name} ({json.dumps(cfg['algorithm'])})")
    _print(f"backbone     {json.dumps(cfg['backbone'])}")
    d, t = cfg["data"], cfg["task"]
    if d["name"] == "sinusoid":
        _print(f"data         sinusoid amplitude=[{d['amplitude_min']}, {d['amplitude_max']}] "
               f"phase=[{d['phase_min']:.3g}, {d['phase_max']:.3g}] x=[{d['x_min']}, {d['x_max']}]")
        _print(f"trained on   {t['k_shots']}-shot regression tasks ({t['n_queries']} query points)")
    else:
        split = meta.get("split")
        # only what describes this source's data: not where it was cached or how it was decoded, nor
        # the split fractions of a tree that came with train/, val/ and test/ folders
        skip = {"name", "cache_dir", "storage", "workers", "memory_budget_gb", "download"}
        if split and split.get("how", "").startswith("the train/, val/ and test/ folders"):
            skip |= {"val_fraction", "test_fraction", "split_seed"}
        shown = " ".join(f"{k}={_short(v)}" for k, v in d.items() if k not in skip and v is not None)
        _print(f"data         {d['name']} {shown}")
        if split:
            from ..training.trainer import split_lines

            first, *rest = split_lines(split)
            _print(f"split        {first.removeprefix('data split: ')}")
            for line in rest:
                _print(f"             {line.strip()}")
        _print(f"images       read as {run_cfg.data.image_format().describe()} (metafit adapt/predict)")
        alg = cfg["algorithm"]
        if alg.get("n_base_classes"):  # pretrained on standard mini-batches (transfer)
            _print(f"trained on   mini-batches of {alg['batch_size']} images over {alg['n_base_classes']} base classes")
        else:
            _print(f"trained on   {t['n_ways']}-way {t['k_shots']}-shot {t['n_queries']}-query tasks")
    _print(f"step         {meta['step']}   values {n_params:,} (weights and buffers)   resumable {'train_state' in meta}")
    _print(f"metafit      {version}")
    if meta.get("metrics"):
        _print(f"metrics      {json.dumps(meta['metrics'])}")
    return 0


def _cmd_configs(args) -> int:
    from ..training import builtin_configs

    if args.fields is not None:
        return _show_fields(args.fields)
    for name, path in sorted(builtin_configs().items()):
        _print(f"{name:32s} {path}")
    return 0


def _field_help(field) -> str:
    """A field's description, with its choices where it takes one of a few literal values."""
    from typing import Literal, get_args, get_origin

    choices = [a for arg in (field.annotation, *get_args(field.annotation)) if get_origin(arg) is Literal
               for a in get_args(arg)]
    text = field.description or ""
    if choices and not all(str(c) in text for c in choices):
        text = f"{text} (one of: {', '.join(map(str, choices))})" if text else f"one of: {', '.join(map(str, choices))}"
    return text


def _entry_summary(cls, module_cls=None) -> str:
    """One line about a registry entry: its ``summary``, else its module's first sentence."""
    import sys as _sys

    text = getattr(cls, "summary", "") or ""
    if not text and module_cls is not None:
        doc = (_sys.modules.get(module_cls.__module__).__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split())
        text = "" if doc.endswith(":") else doc  # a module of several entries says nothing about one
    return text.rstrip(".")


def _show_fields(only: str) -> int:
    """Every config field with its default and meaning, grouped by section and by registry entry
    (``algorithm (name: maml)``); ``only`` (an algorithm, backbone, data source or section name)
    shows just that part."""
    from pydantic import BaseModel

    from ..algorithms import ALGORITHMS
    from ..data import DATASETS
    from ..nn import BACKBONES
    from ..training import RunConfig, make_config
    from ..validation import did_you_mean

    registries = {"data": {k: (v, None) for k, v in DATASETS.items()},
                  "algorithm": {k: (v.Config, v) for k, v in ALGORITHMS.items()},
                  "backbone": {k: (v[0], v[1]) for k, v in BACKBONES.items()}}
    kinds = {"data": "data sources", "algorithm": "algorithms", "backbone": "backbones"}
    cfg = make_config({})
    blocks: list[tuple[str, str, str, list[tuple[str, str, str]]]] = []  # (section, entry, header, fields)
    top = [(key, repr(getattr(cfg, key)), _field_help(field)) for key, field in RunConfig.model_fields.items()
           if not isinstance(getattr(cfg, key), BaseModel)]
    blocks.append(("run", "", "run (top-level keys)", top))
    for section, field in RunConfig.model_fields.items():
        model = getattr(cfg, section)
        if not isinstance(model, BaseModel):
            continue
        if section in registries:  # one block per registered entry, selected by <section>.name
            for name, (cls, module_cls) in registries[section].items():
                default = ", the default" if getattr(model, "name", None) == name else ""
                summary = _entry_summary(cls, module_cls)
                rows = [(f"{section}.{key}",
                         "required" if f.is_required() else repr(f.get_default(call_default_factory=True)),
                         _field_help(f)) for key, f in cls.model_fields.items() if key != "name"]
                blocks.append((section, name, f"{section} (name: {name}{default})" + (f": {summary}" if summary else ""),
                               rows))
            continue
        rows = [(f"{section}.{key}", repr(getattr(model, key)), _field_help(f))
                for key, f in type(model).model_fields.items()]
        blocks.append((section, "", f"{section}" + (f": {field.description}" if field.description else ""), rows))
    if only:
        chosen = [b for b in blocks if only in (b[0], b[1])]
        if not chosen:
            names = [n for reg in registries.values() for n in reg]
            sections = [b[0] for b in blocks if not b[1]]
            listed = "; ".join(f"{kinds[s]}: {', '.join(reg)}" for s, reg in registries.items())
            raise ConfigError(
                f"Configs: --fields NAME must name an algorithm, backbone, data source or config section "
                f"({listed}; sections: {', '.join(dict.fromkeys(sections + list(registries)))}); got {short_repr(only)}."
                f"{did_you_mean(only, names + sections + list(registries))} "
                "Run 'metafit configs --fields' to list every field."
            )
        blocks = chosen
    width = max((len(key) for b in blocks for key, _, _ in b[3]), default=20) + 2
    for i, (_, _, header, rows) in enumerate(blocks):
        _print(("" if i == 0 else "\n") + header)
        for key, default, help_ in rows:
            _print(f"  {key:{width}s} {default:24s} {help_}".rstrip())
    return 0


# MSE of MAML on 5-shot sinusoid regression after 1, 5 and 10 inner steps, read off Finn et al. (2017), Fig. 2
# and the appendix's k=5 panel (the paper gives the curve, not a table).
