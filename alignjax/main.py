"""The alignjax binary: `python -m alignjax.main --config=configs/X.py[:args] --workdir=DIR`.

Overrides: `--config.optimizer.learning_rate=3e-4`. The config is locked, so a misspelt key is
an error naming it. `config.task` picks the task (alignjax.tasks.TASKS).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from alignjax.tasks import TASKS, run_task  # noqa: F401 (re-exported)

# Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM), so a
# scheduler can tell "preempted, resume me" from "done".
PREEMPTED_EXIT_CODE = 143

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (`path.py[:arg]`).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from alignjax import parallel  # after flags: XLA_FLAGS may be set by the caller
  parallel.maybe_initialize_distributed(_CONFIG.value.get("distributed"))
  workdir = _WORKDIR.value
  if "://" not in workdir:  # keep gs:// and other URLs as they are
    workdir = os.path.abspath(os.path.expanduser(workdir))
  logging.info("config:\n%s", _CONFIG.value)
  result = run_task(_CONFIG.value, workdir)
  if isinstance(result, dict) and "preempted_at" in result:
    logging.warning("Preempted at step %d; run the same command again to resume.",
                    result["preempted_at"])
    raise SystemExit(PREEMPTED_EXIT_CODE)


def run():
  """Console-script entry point (`alignjax --config=... --workdir=...`)."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
