"""`dtengine <command>`: parse arguments, build the config, call the component. No logic of its own.

Exit codes: 0 finished; 2 bad input or a run that cannot go on (a `DTEngineError`, one line on stderr; `--debug`
shows the traceback); 130 / 143 a run stopped by SIGINT / SIGTERM after writing its checkpoint (128 + the
signal: not a success, so schedulers retry it); 1 `check-shards` found broken samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from dtengine.runtime.errors import DTEngineError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _distill(args: argparse.Namespace) -> None:
    from dtengine import load_config
    from dtengine.train.distillation import run_distillation
    from dtengine.train.run_config import config_for_resume

    resume, changes = args.resume_from or args.resume, []
    if resume:  # the run's own settings, with what this command changes listed (and checked)
        cfg, changes = config_for_resume(args.config, args.overrides, resume, args.allow_change or [])
    else:
        cfg = load_config(args.config, args.overrides)
    result = run_distillation(cfg, resume=resume, trust_checkpoint=args.trust_checkpoint, changes=changes)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return
    print(f"run directory: {result.run_dir}")
    if result.final_loss is not None:
        first, final = result.first_loss, result.final_loss
        print(f"loss: {first:.4f} (first logged) -> {final:.4f} (final) after {result.steps} steps")
    print(f"backbone: {result.backbone_path}")
    if result.loss_curve is not None:
        print(f"loss curve: {result.loss_curve}")


def _teacher_info(args: argparse.Namespace) -> None:
    from dtengine import load_config
    from dtengine.teachers import describe_teacher

    cfg = load_config(args.config, args.overrides)
    print("\n".join(describe_teacher(cfg.teacher, cfg.data.image_size).lines()))


def _train_teacher(args: argparse.Namespace) -> None:
    from dtengine import load_config
    from dtengine.train.teacher_training import TeacherTrainingConfig, train_teacher

    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides, schema=TeacherTrainingConfig)
    out_dir = train_teacher(cfg)
    print(f"teacher saved to {out_dir} (use it with teacher.path={out_dir})")


def _train_interpreter(args: argparse.Namespace) -> None:
    from dtengine import load_config
    from dtengine.train.interpreter_training import InterpreterTrainingConfig, train_interpreter

    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides, schema=InterpreterTrainingConfig)
    weights, held_out = train_interpreter(cfg)
    if held_out is not None:
        print(
            f"held-out mIoU: {held_out['miou']:.4f} (pixel accuracy {held_out['pixel_accuracy']:.4f}) "
            f"on {held_out['images']} images of {cfg.val_shards}"
        )
    print(f"interpreter saved to {weights} (use it with distill.interpreter={weights.parent})")


def _make_shards(args: argparse.Namespace) -> None:
    from dtengine.data.shards import make_shards_from_folder

    report = make_shards_from_folder(args.from_folder, args.out, samples_per_shard=args.samples_per_shard)
    print(f"wrote {report.written} images into {len(report.shards)} shards in {args.out}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable files:")
        for path, reason in report.skipped:
            print(f"  {path}: {reason}")


def _check_shards(args: argparse.Namespace) -> int:
    from dtengine.data.check import check_shards

    checks = check_shards(args.shards, fix=args.fix)
    for check in checks:
        if check.unreadable:
            print(f"{check.shard}: unreadable ({check.unreadable})")
        for key, why in check.broken:
            print(f"{check.shard}: sample '{key}': {why}" + (" (removed)" if check.fixed else ""))
    broken = sum(len(c.broken) for c in checks)
    unreadable = sum(bool(c.unreadable) for c in checks)
    fixed = sum(c.fixed for c in checks)
    samples = sum(c.samples for c in checks)
    summary = f"{len(checks)} shards, {samples} samples: {broken} broken, {unreadable} unreadable shards"
    print(summary + (f"; rewrote {fixed} shards without their broken samples" if args.fix else ""))
    return 0 if unreadable == 0 and (broken == 0 or args.fix) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtengine", description="DreamTeacher distillation engine")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    distill = commands.add_parser("distill", help="distil a generative teacher's features into a timm backbone")
    distill.add_argument("--config", help="YAML config (see configs/demo.yaml)")
    distill.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    distill.add_argument(
        "--resume-from", metavar="CHECKPOINT", help="continue from this run dir or step_*.pt, writing to out_dir"
    )
    distill.add_argument(
        "--allow-change", action="append", metavar="KEY",
        help="on resume, allow changing this setting (a key, or a section such as optim.) of the run's config",
    )  # fmt: skip
    distill.add_argument(
        "--trust-checkpoint", action="store_true",
        help="load a sharded (FSDP2) checkpoint from outside the run's checkpoints folder (read with pickle)",
    )  # fmt: skip
    distill.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=50")
    distill.set_defaults(func=_distill)

    info = commands.add_parser(
        "teacher-info", help="the configured teacher's levels, channels, strides, parameters and FLOPs per image"
    )
    info.add_argument("--config", help="YAML config of a distillation run (see configs/)")
    info.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. teacher.kind=adm teacher.blocks=[2,5]")
    info.set_defaults(func=_teacher_info)

    teacher = commands.add_parser("train-teacher", help="train a small pixel-space DDPM teacher")
    teacher.add_argument("--out", help="output directory (same as out_dir=DIR)")
    teacher.add_argument("--config", help="YAML config for TeacherTrainingConfig")
    teacher.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=500 data.batch_size=32")
    teacher.set_defaults(func=_train_teacher)

    interpreter = commands.add_parser(
        "train-interpreter", help="train the label interpreter on a frozen teacher's features (label distillation)"
    )
    interpreter.add_argument("--out", help="output directory (same as out_dir=DIR)")
    interpreter.add_argument("--config", help="YAML config for InterpreterTrainingConfig")
    interpreter.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. num_labelled=20 steps=300")
    interpreter.set_defaults(func=_train_interpreter)

    from dtengine.eval.command import add_eval_command

    add_eval_command(commands)

    shards = commands.add_parser("make-shards", help="turn an image folder into WebDataset shards + DALI indexes")
    shards.add_argument("--from-folder", required=True, help="folder searched recursively for jpg/png/webp")
    shards.add_argument("--out", required=True, help="output folder for shard-*.tar, *.idx and manifest.json")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.set_defaults(func=_make_shards)

    check = commands.add_parser("check-shards", help="find samples that do not decode; --fix rewrites shards without")
    check.add_argument("shards", help="shard pattern, e.g. 'data/train-{000000..000127}.tar'")
    check.add_argument("--fix", action="store_true", help="rewrite every shard holding broken samples without them")
    check.set_defaults(func=_check_shards)
    return parser


def _quiet_third_party_warnings() -> None:
    """Third-party deprecation chatter (e.g. xformers built for another torch) buries our own output; dtengine's
    own warnings (too few shards, a checkpoint skipped, a lock taken over) still show."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("default", category=UserWarning, module=r"dtengine(\.|$)")
    warnings.filterwarnings("default", category=UserWarning, message=r"(skipping checkpoint|took over the lock)")


def main(argv: Sequence[str] | None = None) -> int:
    from dtengine.train.stopping import RunStopped

    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_third_party_warnings()
    try:
        code = args.func(args)
    except DTEngineError as err:
        if args.debug:
            raise
        print(
            f"\ndtengine {args.command}: error: {err}"
            if sys.stderr.isatty()
            else f"dtengine {args.command}: error: {err}",
            file=sys.stderr,
        )  # fmt: skip  (a tty may hold a bar)
        return EXIT_BAD_INPUT
    except RunStopped as stopped:
        print(f"dtengine {args.command}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt as err:
        print(f"dtengine {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
