r"""Train the image tokenizer (VQ-VAE) that text-to-image pretraining reads codes from.

  python experiments/train_vq.py --config=experiments/configs/vq.py:tiny --workdir=/tmp/vq
  python experiments/pretrain.py --config=experiments/configs/m6_t2i.py:tiny \
      --config.vq_from=/tmp/vq --workdir=/tmp/t2i

Writes WORKDIR/checkpoints (rerunning resumes), summary.json (vq_psnr, codebook_usage)
and reconstructions.png (held-out originals above their reconstructions).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "configs", "vq.py:tiny"),
    "Config file (path.py:variant); override fields with --config.field=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and summary.json.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    workdir = cli.check_workdir(_WORKDIR.value)
    from m6jax.errors import InputError
    from m6jax.vq.checks import validate_vq_config
    config = _CONFIG.value
    try:
        validate_vq_config(config)
    except ValueError as e:
        cli.refuse(f"config error: {e}")
    from m6jax.vq.train import train
    try:
        train(config, workdir)
    except InputError as e:
        cli.refuse(f"input error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
