"""Shared argument parsing and run-or-print logic for the launch scripts (stdlib only)."""

import argparse
import os
import re
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def make_parser(description):
    """Parser with the flags shared by every launcher."""
    p = argparse.ArgumentParser(
        description=description, allow_abbrev=False,
        epilog="Flags after a bare `--` (and any --config.a.b=value flags) are "
               "passed through to alignjax.main.")
    p.add_argument("--config", required=True,
                   help="config file with optional args, e.g. configs/default.py:only=sft,steps=300")
    p.add_argument("--workdir", required=True, help="output directory (e.g. gs://bucket/run)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="extra environment variable for the run (repeatable)")
    p.add_argument("--python", default="python", help="python executable (default: python)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands instead of running them")
    return p


def parse_args(parser, argv=None):
    """Parses argv; returns args with `.extra` (passthrough flags) and `.env` as (K, V) pairs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if not u.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} "
                     "(put alignjax.main flags after a bare `--`)")
    if "--dry-run" in extra:  # almost certainly misplaced; never launch by accident
        parser.error("--dry-run found after `--`; launcher flags must come before `--`")
    args.extra = unknown + extra

    config_file = args.config.split(":", 1)[0]
    if not os.path.isfile(config_file):
        parser.error(f"--config file not found: {config_file!r} "
                     f"(relative to {os.getcwd()})")
    args.env = parse_env(parser, args.env)
    return args


def parse_env(parser, items):
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(key):
            parser.error(f"invalid --env value {item!r}: expected K=V "
                         "(K a valid environment variable name)")
        pairs.append((key, value))
    return pairs


def main_command(args):
    """argv of the alignjax entry point."""
    return [args.python, "-m", "alignjax.main", f"--config={args.config}",
            f"--workdir={args.workdir}", *args.extra]


def env_prefix(pairs):
    """`env K=V ...` argv prefix (empty when there is nothing to set)."""
    return ["env", *(f"{k}={v}" for k, v in pairs)] if pairs else []


def run(commands, dry_run):
    """Prints (dry run) or runs each argv in order; exits with the first non-zero code."""
    for cmd in commands:
        if dry_run:
            print(shlex.join(cmd), flush=True)
            continue
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        try:
            rc = subprocess.run(cmd, check=False).returncode
        except FileNotFoundError:
            print(f"error: command not found: {cmd[0]}", file=sys.stderr)
            sys.exit(127)
        except KeyboardInterrupt:
            sys.exit(130)
        if rc < 0:  # killed by a signal: report like a shell does
            rc = 128 - rc
        if rc != 0:
            print(f"error: command exited with status {rc}", file=sys.stderr)
            sys.exit(rc)
