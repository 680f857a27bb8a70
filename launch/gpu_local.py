"""Run alignjax.main on one multi-GPU host: a single JAX process drives all visible GPUs."""

import os
import re
import sys

if __package__ in (None, ""):  # executed as `python launch/gpu_local.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common


def visible_devices(gpus):
    """CUDA_VISIBLE_DEVICES for --gpus: None for 'all', 0..N-1 for a count N, else the list."""
    gpus = gpus.strip()
    if gpus == "all":
        return None
    if gpus.isdigit():
        if int(gpus) < 1:
            raise ValueError(f"--gpus count must be >= 1, got {gpus!r}")
        return ",".join(str(i) for i in range(int(gpus)))
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    valid = all(re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+", i) for i in ids)
    if "," not in gpus or not ids or not valid:
        raise ValueError(f"invalid --gpus value {gpus!r}: expected 'all', a count N, "
                         "or a comma-separated id list like 0,1 (use '3,' for a single id)")
    return ",".join(ids)


def build_commands(args):
    env = []
    if args.devices is not None:
        env.append(("CUDA_VISIBLE_DEVICES", args.devices))
    env.append(("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.mem_fraction)))
    env += args.env  # user --env entries come last and win
    return [common.env_prefix(env) + common.main_command(args)]


def main(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--gpus", default="all",
                        help="'all' (default), a count N (GPUs 0..N-1) or an id list like 0,1")
    parser.add_argument("--mem-fraction", type=float, default=0.9,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION (default: 0.9)")
    args = common.parse_args(parser, argv)
    try:
        args.devices = visible_devices(args.gpus)
    except ValueError as e:
        parser.error(str(e))
    if not 0.0 < args.mem_fraction <= 1.0:
        parser.error(f"--mem-fraction must be in (0, 1], got {args.mem_fraction}")
    common.run(build_commands(args), args.dry_run)


if __name__ == "__main__":
    main()
