"""Tests for launch/ scripts: run them via subprocess (mostly with --dry-run) and inspect output."""

import os
import shlex
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, env=None, cwd=REPO):
    cmd = [sys.executable, os.path.join(REPO, "launch", f"{script}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=60)


def dry(script, *args, **kw):
    res = run(script, "--dry-run", *args, **kw)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("def get_config():\n  return None\n")
    return str(path)


@pytest.fixture
def fake_bin(tmp_path):
    """Directory with fake `gcloud`/`sbatch` executables that log their argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("gcloud", "sbatch"):
        exe = bindir / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n'
                       'echo streamed-output\nexit "${FAKE_RC:-0}"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


# ---------------------------------------------------------------- tpu_pod


def test_tpu_pod_run_command(config):
    out = dry("tpu_pod", "--tpu", "my-v5p", "--zone", "us-east5-a", "--project", "proj",
              "--env", "XLA_FLAGS=--xla_a=1 --xla_b", "--config", f"{config}:small",
              "--workdir", "gs://bucket/run", "--config.lr=1e-5", "--", "--foo=x y")
    lines = out.strip().splitlines()
    assert len(lines) == 1  # no setup
    argv = shlex.split(lines[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p"]
    assert "--zone=us-east5-a" in argv and "--project=proj" in argv
    assert "--worker=all" in argv
    remote = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
    assert remote.startswith("cd ~/alignjax && ")
    inner = shlex.split(remote.split(" && ", 1)[1])
    assert inner == ["env", "XLA_FLAGS=--xla_a=1 --xla_b", "python", "-m", "alignjax.main",
                     f"--config={config}:small", "--workdir=gs://bucket/run",
                     "--config.lr=1e-5", "--foo=x y"]
    assert "JAX_COORDINATOR_ADDRESS" not in out  # TPU autodetects


def test_tpu_pod_setup(tmp_path):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "x.py").write_text("")
    (repo / "pyproject.toml").write_text("")
    (repo / ".git").mkdir()
    out = dry("tpu_pod", "--tpu", "t", "--zone", "z", "--setup", "--local-repo", str(repo),
              "--repo-dir", "~/aj", "--config", "configs/x.py", "--workdir", "gs://b/r",
              cwd=str(repo))
    lines = [shlex.split(l) for l in out.strip().splitlines()]
    assert len(lines) == 4
    mkdir, scp, pip, main = lines
    assert "--command=mkdir -p ~/aj" in mkdir
    assert scp[4:6] == ["scp", "--recurse"] and "--worker=all" in scp and "--zone=z" in scp
    assert str(repo / "configs") in scp and str(repo / "pyproject.toml") in scp
    assert str(repo / ".git") not in scp
    assert "t:aj" in scp
    assert "--command=cd ~/aj && python -m pip install -e ." in pip
    assert "--worker=all" in pip
    assert any("--config=configs/x.py" in a for a in main)  # relative to repo on workers


def test_tpu_pod_executes_and_propagates_exit_code(config, fake_bin, tmp_path):
    args = ["--tpu", "t", "--zone", "z", "--config", config, "--workdir", "gs://b/r"]
    ok = run("tpu_pod", *args, env=fake_bin)
    assert ok.returncode == 0, ok.stderr
    assert "streamed-output" in ok.stdout
    assert "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all" in (
        tmp_path / "calls").read_text()
    bad = run("tpu_pod", *args, env={**fake_bin, "FAKE_RC": "3"})
    assert bad.returncode == 3


# ---------------------------------------------------------------- gpu_local


def test_gpu_local_list(config):
    out = dry("gpu_local", "--gpus", "0,1", "--config", config, "--workdir", "/tmp/w",
              "--env", "NCCL_DEBUG=INFO", "--", "--config.seed=3")
    assert shlex.split(out.strip()) == [
        "env", "CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        "NCCL_DEBUG=INFO", "python", "-m", "alignjax.main", f"--config={config}",
        "--workdir=/tmp/w", "--config.seed=3"]


def test_gpu_local_all_and_count(config):
    out = dry("gpu_local", "--config", config, "--workdir", "w", "--mem-fraction", "0.5")
    assert "CUDA_VISIBLE_DEVICES" not in out
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5" in out
    out = dry("gpu_local", "--gpus", "4", "--config", config, "--workdir", "w")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in out


def test_gpu_local_as_module(config):
    res = subprocess.run([sys.executable, "-m", "launch.gpu_local", "--dry-run",
                          "--config", config, "--workdir", "w"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "alignjax.main" in res.stdout


# ---------------------------------------------------------------- slurm


SLURM = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00"]


def test_slurm_script(config, tmp_path):
    workdir = tmp_path / "run"
    out = dry("slurm", *SLURM, "--account", "acc", "--job-name", "dpo", "--port", "23456",
              "--env", "NCCL_DEBUG=WARN", "--config", f"{config}:big",
              "--workdir", str(workdir), "--", "--config.x=1")
    lines = out.strip().splitlines()
    for expected in ["#!/bin/bash", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                     "#SBATCH --time=12:00:00", "#SBATCH --account=acc",
                     "#SBATCH --job-name=dpo", "export NCCL_DEBUG=WARN",
                     'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
                     'export JAX_COORDINATOR_ADDRESS="${head_node}:23456"']:
        assert expected in lines, expected
    assert any("scontrol show hostnames" in l and "SLURM_JOB_NODELIST" in l for l in lines)
    srun = shlex.split([l for l in lines if l.startswith("srun ")][0])
    assert srun[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "bash", "-c"]
    # JAX_PROCESS_ID is single-quoted so it is evaluated per task.
    assert srun[5].startswith("export JAX_PROCESS_ID=$SLURM_PROCID; exec python -m alignjax.main")
    assert f"--config={config}:big" in srun[5] and f"--workdir={workdir}" in srun[5]
    assert "--config.x=1" in srun[5]
    assert lines[-1] == f"sbatch {workdir}/dpo.sbatch"
    assert not workdir.exists()  # dry run writes nothing


def test_slurm_submit_writes_script(config, fake_bin, tmp_path):
    script = tmp_path / "out" / "job.sbatch"
    res = run("slurm", *SLURM, "--config", config, "--workdir", "gs://b/r",
              "--script-out", str(script), env=fake_bin)
    assert res.returncode == 0, res.stderr
    assert "srun " in script.read_text()
    assert (tmp_path / "calls").read_text().strip() == f"sbatch {script}"
    bad = run("slurm", *SLURM, "--config", config, "--workdir", "gs://b/r",
              "--script-out", str(script), env={**fake_bin, "FAKE_RC": "5"})
    assert bad.returncode == 5


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("script,args,message", [
    ("tpu_pod", ["--zone", "z", "--config", "{cfg}", "--workdir", "w"], "--tpu"),
    ("gpu_local", ["--config", "{cfg}"], "--workdir"),
    ("slurm", ["--config", "{cfg}", "--workdir", "w"], "--nodes"),
    ("gpu_local", ["--config", "missing/cfg.py:arg", "--workdir", "w"],
     "--config file not found: 'missing/cfg.py'"),
    ("tpu_pod", ["--tpu", "t", "--zone", "z", "--env", "NOEQUALS", "--config", "{cfg}",
                 "--workdir", "w"], "invalid --env value 'NOEQUALS': expected K=V"),
    ("gpu_local", ["--gpus", "two", "--config", "{cfg}", "--workdir", "w"], "invalid --gpus"),
    ("gpu_local", ["--config", "{cfg}", "--workdir", "w", "--bogus"], "--bogus"),
    ("slurm", [*SLURM[:-1], "1h", "--config", "{cfg}", "--workdir", "w"], "invalid --time"),
    ("gpu_local", ["--config", "{cfg}", "--workdir", "w", "--", "--dry-run"],
     "--dry-run found after `--`"),
])
def test_errors(config, script, args, message):
    res = run(script, "--dry-run", *[a.replace("{cfg}", config) for a in args])
    assert res.returncode != 0
    assert message in res.stderr
