r"""Shards from a folder of captioned photos, for `data.image_text_files`.

  python experiments/make_shards.py --images=DIR --captions=FILE --out=DIR \
      --format=webdataset|parquet|preprocessed [--per_shard=1000] \
      [--image_size=224 --channels=3 --crop_margin=0]     # preprocessed only

FILE is `.tsv` (`image<TAB>caption[<TAB>caption...]` a line) or `.jsonl` (`image`,
`caption`, optional `lang`, `label`), image paths relative to --images. webdataset and
parquet copy image bytes unchanged; preprocessed decodes each image once into uint8
pixels of (--image_size + --crop_margin) px a side (m6jax/data/preprocessed.py), which
the loader reads without decoding. `shards.json` records each shard's size, so a run
opens a shard only when it first reads it. Then train with
`--config.data.image_text_files='DIR/shard-*.tar'` (or `*.parquet`, `*.npy`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_IMAGES = flags.DEFINE_string("images", None, "Folder of the images.")
_CAPTIONS = flags.DEFINE_string("captions", None, "Captions file (.tsv or .jsonl).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the shards.")
_FORMAT = flags.DEFINE_string("format", "webdataset", "webdataset | parquet | preprocessed")
_PER_SHARD = flags.DEFINE_integer("per_shard", 1000, "Records per shard.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "preprocessed: data.image_size of the run")
_CHANNELS = flags.DEFINE_integer("channels", 3, "preprocessed: data.image_channels (1 or 3)")
_CROP_MARGIN = flags.DEFINE_integer("crop_margin", 0, "preprocessed: extra pixels a side "
                                    "stored, so training crops a random window")
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
    if _IMAGE_SIZE.value <= 0 or _CROP_MARGIN.value < 0 or _CHANNELS.value not in (1, 3):
        cli.refuse(f"flag error: --image_size={_IMAGE_SIZE.value} must be positive, "
                   f"--crop_margin={_CROP_MARGIN.value} >= 0, --channels={_CHANNELS.value} 1 or 3")
    try:
        records = shards.read_captions(_CAPTIONS.value, _IMAGES.value)
        missing = [r["image"] for r in records if not os.path.isfile(r["image"])]
        if missing:
            raise InputError(f"--captions={_CAPTIONS.value} names {len(missing)} image(s) not "
                             f"under --images (first: {missing[0]})")
        paths = shards.write_shards(records, _OUT.value, _FORMAT.value, _PER_SHARD.value,
                                    image_size=_IMAGE_SIZE.value, channels=_CHANNELS.value,
                                    crop_margin=_CROP_MARGIN.value)
    except (InputError, ValueError, OSError) as e:
        cli.refuse(f"input error: {e}")
    ext = shards.EXTS[_FORMAT.value]
    print(f"wrote {len(records)} records in {len(paths)} shard(s): "
          f"{os.path.join(_OUT.value, 'shard-*.' + ext)}")


if __name__ == "__main__":
    app.run(main)
