"""Launch helpers for running `python -m alignjax.main` on TPU pods, GPU hosts and Slurm."""
