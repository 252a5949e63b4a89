r"""M6 pretraining entry point.

  python experiments/pretrain.py --config=experiments/configs/m6.py:tiny --workdir=/tmp/m6
  python experiments/pretrain.py --config=experiments/configs/m6.py:tiny \
      --config.total_steps=100 --config.mesh.data=2 --workdir=/tmp/m6_short

Several processes (hosts) form one mesh with `--distributed` (JAX detects SLURM, TPU
pods, Kubernetes) or with all of --coordinator_address/--num_processes/--process_id
(what launch/local.py passes); see launch/ and docs/scale.md, "Multi-host launch".
"""
import os
import sys

# Runnable as a script from a clone without installing: make `m6jax` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from m6jax import cli  # noqa: E402

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "configs", "m6.py:tiny"),
    "Config file (path.py:variant); override fields with --config.field=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, tokenizer, summary.")
flags.mark_flags_as_required(["workdir"])
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection "
    "(SLURM, TPU pod, Kubernetes) before anything else.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")


def _maybe_initialize_distributed():
    """jax.distributed must start before any other JAX call in the process."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _DISTRIBUTED.value and all(v is None for v in explicit):
        return
    from m6jax import distributed
    try:
        distributed.initialize(*explicit)
    except ValueError as e:
        cli.refuse(f"flag error: {e}")


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    workdir = cli.check_workdir(_WORKDIR.value)
    _maybe_initialize_distributed()
    import jax  # imported after flag parsing, so XLA flags from the caller apply

    from m6jax import plan
    from m6jax.config_checks import clamp_warmup, validate_config
    from m6jax.errors import InputError
    from m6jax.train.loop import train
    config = _CONFIG.value
    notice = clamp_warmup(config)
    if notice:
        logging.info(notice)
    try:  # refuse a bad config with one clear line, before anything is built
        validate_config(config, jax.device_count())
        plan.check_offload(config, jax.devices())
    except ValueError as e:
        cli.refuse(f"config error: {e}")
    if cli.verbose():
        logging.info("config:\n%s", config)
    else:
        logging.info("%s (--verbosity=0 prints every field)", cli.config_line(sys.argv))
    from m6jax.train.resume import NonFiniteLoss, Preempted
    try:
        train(config, workdir)
    except Preempted as e:  # the checkpoint is written: a clean exit, resumable
        print(str(e), flush=True)
    except NonFiniteLoss as e:
        sys.exit(f"stopped: {e}")
    except InputError as e:  # bad data files or a checkpoint of another model, before compiling
        cli.refuse(f"input error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
