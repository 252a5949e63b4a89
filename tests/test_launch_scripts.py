"""The cluster launch files run the real entry point with flags it accepts and a config
that validates on the device count the file asks for (as far as this machine can tell:
shell syntax, YAML, and the command each one runs, captured with fake srun / gcloud)."""
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

LAUNCH = os.path.join(ROOT, "launch")

# Parses a pretrain.py command line with its own absl flags and validates the config
# on the device count given, without building anything.
_CHECK = r"""
import json, sys
argv, num_devices = json.loads(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, "experiments")
import pretrain
from absl import flags
flags.FLAGS(argv)
from m6jax.config_checks import validate_config
config = pretrain._CONFIG.value
shape = validate_config(config, num_devices)
print(json.dumps(dict(devices=int(config.hardware.num_devices), mesh=list(shape),
                      distributed=flags.FLAGS.distributed,
                      num_processes=flags.FLAGS.num_processes)))
"""


def _check_pretrain_argv(argv, num_devices):
    """argv = [script, flags...] as the launcher runs it; returns what the flags parse to."""
    assert argv[0] == "experiments/pretrain.py", argv
    proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(argv), str(num_devices)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fake_bin(tmp_path, name):
    """A stand-in for `name` that records its arguments, one per line."""
    log = tmp_path / f"{name}.args"
    path = tmp_path / name
    path.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {log}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return log


def _run_script(tmp_path, script, fake, env=()):
    log = _fake_bin(tmp_path, fake)
    e = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", **dict(env))
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("script", ["slurm.sbatch", "tpu_pod.sh"])
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)


def test_slurm_runs_pretrain_on_the_configs_device_count(tmp_path):
    args = _run_script(tmp_path, "slurm.sbatch", "srun")
    i = args.index("python")
    with open(os.path.join(LAUNCH, "slurm.sbatch"), encoding="utf-8") as f:
        sbatch = dict(line.split()[1][2:].split("=", 1) for line in f
                      if line.startswith("#SBATCH"))
    nodes, gpus = int(sbatch["nodes"]), int(sbatch["gpus-per-node"])
    parsed = _check_pretrain_argv(args[i + 1:], nodes * gpus)
    assert parsed["distributed"] and parsed["devices"] == nodes * gpus == 128


def test_tpu_pod_script_runs_pretrain_on_every_worker(tmp_path):
    args = _run_script(tmp_path, "tpu_pod.sh", "gcloud", dict(TPU_NAME="t", ZONE="z"))
    assert "--worker=all" in args
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    words = shlex.split(command)
    i = words.index("python")
    assert words[:i] == ["cd", "~/m6jax", "&&"]
    parsed = _check_pretrain_argv(words[i + 1:], 8)
    assert parsed["distributed"]


def test_tpu_pod_script_refuses_a_missing_tpu_name():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "TPU_NAME" in proc.stderr


def test_jobset_manifest_parses_and_runs_pretrain_on_512_gpus():
    with open(os.path.join(LAUNCH, "jobset.yaml"), encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    pods, gpus = job["parallelism"], container["resources"]["limits"]["nvidia.com/gpu"]
    assert job["completionMode"] == "Indexed" and job["completions"] == pods
    command = container["command"]
    assert command[:2] == ["bash", "-c"]
    words = shlex.split(command[2].replace("$JOB_COMPLETION_INDEX", "0"))
    assert words[0] == "python"
    parsed = _check_pretrain_argv(words[1:], pods * gpus)
    assert parsed["devices"] == pods * gpus == 512 and parsed["num_processes"] == pods
