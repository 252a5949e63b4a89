r"""Shards from a folder of captioned photos, for `data.image_text_files`.

  python experiments/make_shards.py --images=DIR --captions=FILE --out=DIR \
      --format=webdataset|parquet [--per_shard=1000]

FILE is `.tsv` (`image<TAB>caption[<TAB>caption...]` a line) or `.jsonl` (`image`,
`caption`, optional `lang`, `label`), image paths relative to --images. Image bytes are
copied unchanged. Then train with
`--config.data.image_text_files='DIR/shard-*.tar'` (or `*.parquet`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_IMAGES = flags.DEFINE_string("images", None, "Folder of the images.")
_CAPTIONS = flags.DEFINE_string("captions", None, "Captions file (.tsv or .jsonl).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the shards.")
_FORMAT = flags.DEFINE_string("format", "webdataset", "webdataset | parquet")
_PER_SHARD = flags.DEFINE_integer("per_shard", 1000, "Records per shard.")
flags.mark_flags_as_required(["images", "captions", "out"])


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    from m6jax.data import shards
    from m6jax.errors import InputError
    if not os.path.isdir(_IMAGES.value):
        cli.refuse(f"flag error: --images={_IMAGES.value} is not a folder")
    if not os.path.isfile(_CAPTIONS.value):
        cli.refuse(f"flag error: --captions={_CAPTIONS.value}: no such file")
    if _PER_SHARD.value <= 0:
        cli.refuse(f"flag error: --per_shard={_PER_SHARD.value} must be positive")
    try:
        records = shards.read_captions(_CAPTIONS.value, _IMAGES.value)
        missing = [r["image"] for r in records if not os.path.isfile(r["image"])]
        if missing:
            raise InputError(f"--captions={_CAPTIONS.value} names {len(missing)} image(s) not "
                             f"under --images (first: {missing[0]})")
        paths = shards.write_shards(records, _OUT.value, _FORMAT.value, _PER_SHARD.value)
    except (InputError, ValueError) as e:
        cli.refuse(f"input error: {e}")
    ext = "tar" if _FORMAT.value == "webdataset" else "parquet"
    print(f"wrote {len(records)} records in {len(paths)} shard(s): "
          f"{os.path.join(_OUT.value, 'shard-*.' + ext)}")


if __name__ == "__main__":
    app.run(main)
