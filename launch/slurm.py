"""Submit alignjax.main as a multi-node Slurm job: one JAX process (srun task) per node."""

import os
import re
import shlex
import sys

if __package__ in (None, ""):  # executed as `python launch/slurm.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common


def build_script(args):
    q = shlex.quote
    sbatch = {
        "job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
        "gpus-per-node": args.gpus_per_node, "partition": args.partition, "time": args.time,
        "account": args.account, "cpus-per-task": args.cpus_per_task, "output": args.log,
    }
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
    srun_cpus = f" --cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else ""
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if v is not None]
    lines += ["", "set -euo pipefail", f"cd {q(args.chdir)}"]
    lines += [f"export {k}={q(v)}" for k, v in args.env]
    lines += [
        "",
        "# Coordinator = first node of the allocation; one JAX process per node.",
        "head_node=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | awk 'NR==1')",
        f'export JAX_COORDINATOR_ADDRESS="${{head_node}}:{args.port}"',
        'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
        'echo "coordinator=$JAX_COORDINATOR_ADDRESS processes=$JAX_NUM_PROCESSES"',
        "",
        # JAX_PROCESS_ID must be read inside each task, hence the single-quoted bash -c.
        f"srun --nodes={args.nodes} --ntasks-per-node=1{srun_cpus} bash -c "
        + q("export JAX_PROCESS_ID=$SLURM_PROCID; exec " + shlex.join(common.main_command(args))),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    parser.add_argument("--partition", required=True)
    parser.add_argument("--time", required=True, help="time limit HH:MM:SS (or D-HH:MM:SS)")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="alignjax")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs for each node's process")
    parser.add_argument("--port", type=int, default=12355, help="coordinator port (default 12355)")
    parser.add_argument("--script-out", help="where to write the sbatch script "
                        "(default: WORKDIR/<job-name>.sbatch, or ./ if WORKDIR is remote)")
    args = common.parse_args(parser, argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be >= 1")
    if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", args.time):
        parser.error(f"invalid --time {args.time!r}: expected HH:MM:SS or D-HH:MM:SS")
    if not 0 < args.port < 65536:
        parser.error(f"invalid --port {args.port}")

    local_workdir = "://" not in args.workdir
    out_dir = os.path.abspath(args.workdir) if local_workdir else os.getcwd()
    script = os.path.abspath(args.script_out or os.path.join(out_dir, f"{args.job_name}.sbatch"))
    args.chdir = os.getcwd()  # the job runs where --config was checked
    args.log = os.path.join(out_dir, "slurm-%j.out") if local_workdir else None
    text = build_script(args)
    if args.dry_run:
        print(text)
    else:
        os.makedirs(os.path.dirname(script), exist_ok=True)
        with open(script, "w") as f:
            f.write(text)
        print(f"wrote {script}", file=sys.stderr)
    common.run([["sbatch", script]], args.dry_run)


if __name__ == "__main__":
    main()
