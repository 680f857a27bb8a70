"""Run alignjax.main on every worker of a Cloud TPU VM pod slice via `gcloud ... ssh --worker=all`.

jax.distributed.initialize() autodetects the pod topology, so no distributed env vars are set.
"""

import os
import shlex
import sys

if __package__ in (None, ""):  # executed as `python launch/tpu_pod.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common


def remote_path(path):
    """Shell-quotes a remote path while keeping a leading `~` expandable."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def build_commands(args):
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    def ssh(command):
        return gcloud + ["ssh", args.tpu, *where, "--worker=all", f"--command={command}"]

    cd = f"cd {remote_path(args.repo_dir)} && "
    cmds = []
    if args.setup:
        # Copy the top-level entries into an existing dir (scp rejects `src/.`); scp treats
        # remote relative paths as relative to $HOME and does not expand `~`.
        scp_dest = args.repo_dir[2:] if args.repo_dir.startswith("~/") else args.repo_dir
        local = os.path.abspath(args.local_repo)
        skip = lambda n: n.startswith(".") or n == "__pycache__" or n.endswith(".egg-info")
        srcs = [os.path.join(local, n) for n in sorted(os.listdir(local)) if not skip(n)]
        cmds.append(ssh(f"mkdir -p {remote_path(args.repo_dir)}"))
        cmds.append(gcloud + ["scp", "--recurse", *srcs, f"{args.tpu}:{scp_dest}",
                              *where, "--worker=all"])
        cmds.append(ssh(cd + shlex.join([args.python, "-m", "pip", "install", "-e", "."])))
    run = common.env_prefix(args.env) + common.main_command(args)
    cmds.append(ssh(cd + shlex.join(run)))
    return cmds


def main(argv=None):
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. us-east5-a")
    parser.add_argument("--project", help="GCP project (default: gcloud config)")
    parser.add_argument("--repo-dir", default="~/alignjax",
                        help="repo location on the workers (default: ~/alignjax)")
    parser.add_argument("--local-repo", default=common.REPO_ROOT,
                        help="local checkout copied by --setup (default: this repo)")
    parser.add_argument("--setup", action="store_true",
                        help="first copy the local repo to all workers and pip install -e it")
    args = common.parse_args(parser, argv)

    home = os.path.expanduser("~")
    if args.repo_dir.startswith(home + os.sep):  # `~` was expanded by the local shell
        args.repo_dir = "~" + args.repo_dir[len(home):]
    # The config path is resolved on the workers relative to --repo-dir.
    cfg_file, sep, cfg_args = args.config.partition(":")
    rel = os.path.relpath(os.path.abspath(cfg_file), os.path.abspath(args.local_repo))
    if not rel.startswith(os.pardir):
        args.config = rel + sep + cfg_args
    if "://" not in args.workdir:
        print(f"warning: --workdir {args.workdir!r} is not a shared (gs://) path; "
              "each worker will write locally", file=sys.stderr)
    common.run(build_commands(args), args.dry_run)


if __name__ == "__main__":
    main()
