"""One process of the localhost multi-process test (see test_multihost.py).

argv: process_id num_processes port workdir num_steps out.npz [task]
Runs SFT (or task "dpo" or "rl") on 4 simulated CPU devices per process with gloo collectives and saves
the host-local token batches it fed to training.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  pid, nproc, port, workdir, steps, out = sys.argv[1:7]
  task = sys.argv[7] if len(sys.argv) > 7 else "sft"
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(nproc), process_id=int(pid))
  from tests.multihost_config import config, dpo_config, record_batches, rl_config  # noqa: E402
  from alignjax.trainers import dpo, rl, sft  # noqa: E402
  run, make_config = {"dpo": (dpo.run, dpo_config), "rl": (rl.run, rl_config)}.get(
      task, (sft.run, config))
  with record_batches() as seen:
    run(make_config(int(steps)), workdir)
  np.savez(out, tokens=np.stack(seen) if seen else np.zeros(0), devices=jax.device_count(),
           local=jax.local_device_count())
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
