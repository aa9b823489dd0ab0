"""Implementations of the CLI commands (``cmd_<name>(args) -> exit code``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.errors import HarnessError


def cmd_run(args) -> int:
    from harness.orchestration.plan import plan_runs
    from harness.orchestration.scheduler import check_output_dir, execute
    from harness.report import (
        RESULT_HEADERS,
        fp_references,
        replicate_table,
        result_rows,
        table,
    )
    from harness.store import Store

    experiment = _experiment_of(args)
    specs = plan_runs(experiment)
    scheduler = experiment.scheduler
    if getattr(args, "dry_run", False):
        return _dry_run(args, experiment, specs)
    _check_device_mem(args)
    _check_scheduler_flags(args, scheduler, distributed=bool(experiment.train_workers))
    if experiment.train_workers:
        _check_distributable(specs, experiment.train_workers)
    # runs start from this process (always those with workers: their own process is this
    # one, their workers train on its kind of device): plan them for its device
    if scheduler != "ray" or experiment.train_workers:
        specs = _fit_to_device(specs, args, experiment.train_workers or 1)
        _check_task_data(specs)  # a Ray worker's dataset cache may be another machine's
        from harness.eval.ppl_data import check_available

        check_available(sorted({e for spec in specs for e in spec.eval.ppl_data}))
    check_output_dir(Path(args.output_dir))  # before the database or any run row is touched
    store = Store(args.db)
    experiment_id = None
    if experiment.name:
        experiment_id = store.experiment_id(experiment.name, experiment.source.read_text())
    _announce(specs)
    outcomes = execute(specs, store, args.output_dir, scheduler=scheduler, force=args.force,
                       device=args.device, experiment_id=experiment_id,
                       ray_address=getattr(args, "ray_address", None),
                       gpus_per_run=experiment.gpus_per_run or 0.0,
                       cpus_per_run=getattr(args, "cpus_per_run", None) or 1.0,
                       workers_per_run=experiment.train_workers)
    entries = [store.run_as_dict(store.get_run(o.run_id)) for o in outcomes]
    # the FP PPL of each evaluation protocol, from this command or the database
    fp_ppl = fp_references(store.run_as_dict(r) for r in store.runs("finished")
                           if r.method == "fp")
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
    else:
        print()
        print(table(RESULT_HEADERS, result_rows(entries, fp_ppl)))
        replicates = replicate_table(entries)
        if replicates:
            print(replicates)
        skipped = sum(o.status == "skipped" for o in outcomes)
        if skipped:
            print(f"({skipped} run(s) already finished were reused; --force reruns them)")
        for o in outcomes:
            if o.status == "busy":
                print(f"(run {o.spec.run_key} ({o.spec.method}) is {o.error}: not started "
                      f"twice; rerun this command once it has finished)")
        _print_eval_note(specs)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"error: run {o.spec.run_key} ({o.spec.method}) failed: "
              f"{o.error.splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


def _check_distributable(specs, workers: int) -> None:
    """Before any run row: every training run's settings split over ``workers``."""
    from harness.registry import build_method
    from harness.train.distributed import check_distributable

    for spec in specs:
        train = getattr(build_method(spec).config, "train", None)
        if train is not None:
            check_distributable(train, workers)


def _check_device_mem(args) -> None:
    mem = getattr(args, "device_mem", None)
    if mem is not None and mem <= 0:
        raise HarnessError(f"--device-mem {mem:g}: expected a positive size in GiB")


def _fit_to_device(specs, args, workers: int) -> list:
    """Training runs that do not fit the device as configured get the changes that keep their
    result (not in the run key): a sharded teacher, then pieces of each micro-batch
    (``train.teacher_shard``, ``train.micro_batch``); each one is announced."""
    from harness.memory_plan import fit_to_device

    specs, notes = fit_to_device(specs, args.device, getattr(args, "device_mem", None), workers)
    for note in notes:
        print(note)
    return specs


def _dry_run(args, experiment, specs) -> int:
    """``harness run --dry-run``: each run's estimated peak memory per device, nothing loaded,
    run or stored; a run that cannot fit is an error naming the options (exit 2)."""
    from harness.memory_plan import dry_run

    _check_device_mem(args)
    print(dry_run(specs, args.device, args.device_mem, workers=experiment.train_workers or 1))
    return 0


def _experiment_of(args):
    """The experiment ``harness run`` was given: a file (its flags override it) or flags."""
    from harness.errors import require_module

    if args.experiment:
        experiments = require_module("harness.orchestration.experiments", "experiment files")
        return experiments.Experiment.from_yaml(args.experiment).with_flags(args)
    from harness.orchestration.experiments import Experiment

    return Experiment.from_flags(args)


def _check_scheduler_flags(args, scheduler: str, distributed: bool = False) -> None:
    """Flags of one scheduler given to the other are refused, not silently ignored; the device
    is checked here for inline runs (a Ray worker checks its own). ``distributed``: runs train
    on Ray Train workers, which join ``--ray-address`` and span ``--gpus-per-run`` GPUs."""
    from harness.devices import pick_device

    if scheduler != "ray":
        ray_flags = ("--cpus-per-run",) if distributed else (
            "--ray-address", "--gpus-per-run", "--cpus-per-run")
        ray_only = [flag for flag in ray_flags
                    if getattr(args, flag[2:].replace("-", "_"), None)]
        if ray_only:
            many = len(ray_only) > 1
            raise HarnessError(f"{', '.join(ray_only)} only appl{'y' if many else 'ies'} to the "
                               f"Ray scheduler; add --scheduler ray or drop "
                               f"{'them' if many else 'it'}")
    if getattr(args, "device", None):
        pick_device(args.device, here=scheduler != "ray")


def _check_task_data(specs) -> None:
    """A standard lm-eval suite without cached data fails here, not after every run's PPL."""
    from harness.config import OFFLINE_TASKS

    tasks = sorted({t for spec in specs for t in spec.eval.tasks})
    if any(t not in OFFLINE_TASKS for t in tasks):
        from harness.errors import require_module

        require_module("harness.eval.accuracy", "--tasks").check_task_data(tasks)


def _announce(specs) -> None:
    for spec in specs:
        g = spec.group_size
        detail = (f"fmt={spec.fmt} bits={spec.bits} group={g}" if spec.bits is not None
                  else "unquantized reference")
        print(f"[{spec.run_key}] {spec.method:12s} {spec.model} {detail} profile={spec.profile}",
              file=sys.stderr)


def _print_eval_note(specs) -> None:
    from harness.eval.ppl_data import label, metric_name

    spec = specs[0]
    cap = spec.eval.max_tokens
    scope = f"first {cap:,} tokens" if cap else "all tokens"
    data = "; ".join(f"{metric_name(e)} = {label(e)}" for e in spec.eval.ppl_data)
    print(f"PPL: {scope} of each data set ({data}), windows of {spec.eval.seq_len} "
          f"(profile {spec.profile}); 95% CI: bootstrap over windows.")


def cmd_methods(args) -> int:
    from pydantic import ValidationError
    from pydantic_core import to_jsonable_python

    from harness.registry import METHODS, get_method

    rows = []
    for name in METHODS.names():
        cls = get_method(name)
        try:  # the defaults as a run gets them: validators fill some (fmt follows bits)
            config = cls.Config()
            # every field, those a run's dump leaves out while unset (init) included
            fields = {k: to_jsonable_python(getattr(config, k)) for k in cls.Config.model_fields}
        except ValidationError:  # a plugin config with required fields: the declared ones
            fields = {}
            for fname, field in cls.Config.model_fields.items():
                default = (field.default if field.default_factory is None
                           else field.default_factory())
                fields[fname] = default.model_dump() if hasattr(default, "model_dump") else default
        rows.append({"name": name, "description": cls.summary(),
                     "citation": vars(cls).get("citation", ""), "config": fields})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        print(f"{row['name']:14s} {row['description']}")
        if row["citation"]:
            print(f"    ({row['citation']})")
        for k, v in row["config"].items():
            print(f"    {k} = {json.dumps(v, default=str)}")
    return 0


def cmd_list(args) -> int:
    from harness.report import acc_avg_cell, ci_cell, fmt_num, replicate_table, table
    from harness.store import Store

    store = Store(args.db, readonly=True)
    runs = store.runs(args.status)
    if args.json:
        print(json.dumps([store.run_as_dict(r) for r in runs], indent=2, default=str))
        return 0
    if not runs:
        print(f"no {args.status} runs" if args.status and store.runs() else
              "no runs yet; try: harness run --methods rtn --bits 3")
        return 0
    rows, entries = [], []
    for r in runs:
        e = store.run_as_dict(r)
        m = e["metrics"]
        entries.append(e)
        rows.append([r.id, r.run_key, r.method, r.model, fmt_num(r.bits), fmt_num(r.group_size),
                     fmt_num(r.seed), fmt_num(m.get("ppl")), ci_cell(m), acc_avg_cell(m),
                     fmt_num(m.get("size_mb")), r.status])
    print(table(["id", "run", "method", "model", "bits", "group", "seed", "PPL", "PPL 95% CI",
                 "acc", "size MB", "status"], rows))
    replicates = replicate_table(entries)
    if replicates:
        print()
        print(replicates)
    return 0


def cmd_report(args) -> int:
    from harness.report import render_report
    from harness.store import Store

    store = Store(args.db, readonly=True)
    entries = [store.run_as_dict(r) for r in store.runs("finished")]
    if args.methods:
        unknown = sorted(set(args.methods) - {e["method"] for e in entries})
        if unknown:
            raise HarnessError(f"--methods: no finished {', '.join(unknown)} run in {args.db}; "
                               f"`harness list` shows the runs")
    if not entries:
        print(f"no finished runs in {args.db}; try: harness run --methods rtn --bits 3")
        return 0
    print(render_report(entries, markdown=args.markdown, methods=args.methods))
    return 0


def cmd_show(args) -> int:
    from harness.report import fmt_num
    from harness.store import Store

    store = Store(args.db, readonly=True)
    run = store.get_run(args.run)
    data = store.run_as_dict(run)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"run {run.run_key} (id {run.id}): {run.method} on {run.model}, status {run.status}")
    if run.error:
        print(f"error: {run.error}")
    print("spec:", json.dumps(run.spec, sort_keys=True))
    print(f"wall time: {fmt_num(run.wall_s, 1)} s  device: {run.device}  host: {run.host}")
    when = [f"{label} {t:%Y-%m-%d %H:%M:%S}" for label, t in
            (("started", run.started_at), ("finished", run.finished_at)) if t is not None]
    if when:
        print("  ".join(when) + " UTC" + (f"  attempts: {run.attempts}" if (run.attempts or 0) > 1 else ""))
    metrics = data["metrics"]
    for name in sorted(k for k in metrics if _is_ppl_metric(k)):
        low, high = metrics.get(f"{name}_ci95_low"), metrics.get(f"{name}_ci95_high")
        interval = (f" (95% CI {fmt_num(low)}-{fmt_num(high)}, bootstrap over windows)"
                    if low is not None and high is not None else " (no interval stored)")
        print(f"{name}: {fmt_num(metrics[name])}{interval}")
    print("metrics:")
    for key, value in sorted(metrics.items()):
        print(f"  {key:28s} {fmt_num(value, 4)}")
    for kind, path in data["artifacts"].items():
        print(f"artifact {kind}: {path}")
    return 0


def _is_ppl_metric(name: str) -> bool:
    """``ppl`` and ``ppl_<data>``, not their intervals or token counts."""
    return (name == "ppl" or name.startswith("ppl_")) and not name.endswith(
        ("_ci95_low", "_ci95_high", "_tokens"))


def cmd_compare(args) -> int:
    from harness.compare import compare_runs, render_compare
    from harness.store import Store

    store = Store(args.db, readonly=True)
    result = compare_runs(store, args.run_a, args.run_b)
    print(json.dumps(result, indent=2) if args.json else render_compare(result))
    return 0


def cmd_export(args) -> int:
    from harness.export import export_run
    from harness.store import Store

    store = Store(args.db, readonly=True)
    written = export_run(store, store.get_run(args.run), Path(args.dir), packed_only=args.packed)
    for path in written:
        print(path)
    return 0


def cmd_eval(args) -> int:
    from harness.eval.saved import evaluate_path, evaluate_stored_run

    opts = dict(text_file=args.text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                tasks=args.tasks, limit=args.limit, device=args.device,
                num_fewshot=args.num_fewshot, allow_code_eval=args.allow_code_eval)
    if Path(args.run).exists():  # an exported model: no database involved
        result = evaluate_path(args.run, **opts)
    else:
        from harness.store import Store

        store = Store(args.db, readonly=True)
        result = evaluate_stored_run(store, store.get_run(args.run), **opts)
    print(f"ppl={result['ppl']:.4f} tokens={result['tokens']}")
    for key, value in result.items():
        if key not in ("ppl", "tokens"):
            print(f"{key}={value}")
    return 0


def cmd_gen_data(args) -> int:
    from harness.train.teacher_data import generate_cli

    return generate_cli(args)


def cmd_dashboard(args) -> int:
    from harness.errors import require_module

    return require_module("dashboard.launch", "the dashboard").launch(args.db, args.port)
