"""The `chainrule` command: train a spec locally now; serve, submit and watch over gRPC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from chainrule.spec_file import load_job_spec
    from scheduler.training import train_job
    from services.progress import TrainingProgress

    spec = load_job_spec(args.spec)
    progress = TrainingProgress(spec.name or "training", total_steps=0)
    with progress:
        result = train_job(
            spec, workers=args.workers, parameter_servers=args.parameter_servers,
            ray_address=args.ray_address, output=args.output,
            on_step=lambda r: progress.step(r.step, r.total_steps, r.epoch, r.loss,
                                            r.samples_per_second),
            on_evaluation=lambda e: progress.evaluation(e.loss, e.accuracy),
        )
    final = result.final_evaluation
    if final is not None:
        summary = f"validation loss {final.loss:.4f}"
        if final.accuracy is not None:
            summary += f", validation accuracy {final.accuracy:.4f}"
        print(f"{spec.name or 'job'}: {result.steps} steps, {summary}")
    if args.output:
        print(f"weights written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chainrule", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a job spec on Ray without the service")
    train.add_argument("spec", help="job spec file (.yaml, .yml or .json)")
    train.add_argument("--workers", type=int, help="worker count (overrides the spec)")
    train.add_argument("--parameter-servers", type=int, help="PS shard count (overrides)")
    train.add_argument("--ray-address", help="join this Ray cluster instead of embedded Ray")
    train.add_argument("-o", "--output", help="write weights here (.safetensors or .npz)")
    train.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as error:  # SpecError is a ValueError: name the field, no trace
        print(f"chainrule: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
