"""The Burgers training launched with submitit's SLURM executor, then handed to orchd to watch.

    python -m workloads.submitit_burgers --folder runs/submitit --rules rules.yaml [--epochs 2] [--fail]

submitit submits ``train`` as a SLURM job (a pickled call; its stdout is the training log) and
prints the job id; ``orchestrator.adopt.watch_submitit`` records it as an orchd job, so orchd's
rules (``expect``, ``success``, ``cancel_if``), alerts and reports apply to it, and an exception
``train`` raises becomes the job's reason. The same from a shell: ``orchd watch --submitit
FOLDER/JOBID --spec rules.yaml``. Needs ``pip install submitit`` and SLURM's ``sbatch`` here.
"""

from __future__ import annotations

import argparse
import sys


def train(epochs: int, ckpt_dir: str, fail: bool = False) -> float:
    """What runs on the node: the Burgers training; returns nothing useful to orchd (it reads the
    log). ``fail``: raise before training, as a misconfigured run would."""
    from workloads import burgers

    if fail:
        raise ValueError(f"learning rate schedule needs epochs >= 3, got {epochs}")
    burgers.main(["--epochs", str(epochs), "--ckpt-dir", ckpt_dir])
    return 0.0


def main(argv: list[str] | None = None) -> None:
    import submitit

    from orchestrator import service
    from orchestrator.adopt import watch_submitit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default="runs/submitit", help="submitit's folder (logs, pickles)")
    p.add_argument("--rules", default=None, help="orchd rules YAML (a spec without command)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--partition", default=None)
    p.add_argument("--fail", action="store_true", help="raise in the job instead of training")
    args = p.parse_args(argv)
    executor = submitit.AutoExecutor(folder=args.folder, cluster="slurm")
    executor.update_parameters(timeout_min=30, nodes=1, tasks_per_node=1, name="burgers-submitit",
                               **({"slurm_partition": args.partition} if args.partition else {}))
    job = executor.submit(train, args.epochs, f"{args.folder}/checkpoints", args.fail)
    orchd_job = watch_submitit(service.open_app(), job, rules=args.rules)
    print(f"submitit job {job.job_id} is orchd job {orchd_job}", file=sys.stderr)
    print(orchd_job)


if __name__ == "__main__":
    main()
