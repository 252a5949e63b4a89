r"""Encode a data set's images once with a trained image tokenizer, for text-to-image runs.

  python experiments/encode_codes.py --vq_from=/tmp/vq --out=/tmp/codes \
      [--image_text_files='shards/shard-*.tar'] [--process_index=0 --process_count=1]
  python experiments/pretrain.py --config=experiments/configs/m6_t2i.py:tiny \
      --config.vq_from=/tmp/vq --config.data.codes_dir=/tmp/codes --workdir=/tmp/t2i

Writes OUT/<file name>.codes.npy per image-text file (int32 [records, codes]) and
OUT/codes.json (m6jax/t2i/codes.py). --image_text_files '' = the shipped digits. With
several processes (one per host, or several on one machine) process i encodes files i,
i + n, ... only; run them all with the same --out. The run then reads codes and never
runs the VQ encoder at start-up.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_VQ_FROM = flags.DEFINE_string("vq_from", None, "The image tokenizer's workdir (train_vq.py).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the codes.")
_FILES = flags.DEFINE_string("image_text_files", "", "Comma-separated globs; '' = the digits.")
_INDEX = flags.DEFINE_integer("process_index", 0, "This process's index.")
_COUNT = flags.DEFINE_integer("process_count", 1, "Processes sharing the files.")
_BATCH = flags.DEFINE_integer("batch", 256, "Images per encoder call.")
flags.mark_flags_as_required(["vq_from", "out"])


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    if not 0 <= _INDEX.value < _COUNT.value:
        cli.refuse(f"flag error: --process_index={_INDEX.value} must be in [0, "
                   f"--process_count={_COUNT.value})")
    from m6jax.errors import InputError
    from m6jax.t2i import codes
    from m6jax.vq.data import TokenizerImages
    from m6jax.vq.load import ImageTokenizer
    try:
        tokenizer = ImageTokenizer(_VQ_FROM.value, "--vq_from")
        images = TokenizerImages(_FILES.value, tokenizer.image_size, tokenizer.channels)
        mine = range(_INDEX.value, len(images.source.files), _COUNT.value)
        paths = codes.encode_files(tokenizer, _VQ_FROM.value, images, mine, _OUT.value, _BATCH.value)
    except (InputError, ValueError, OSError) as e:
        cli.refuse(f"input error: {e}")
    print(f"process {_INDEX.value}/{_COUNT.value}: {len(paths)} file(s) of codes "
          f"({tokenizer.num_codes} a record) in {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
