r"""Embeddings from an M6 checkpoint, written with their ids; a faiss index and search.

  # 1. embed: texts, images or image+text pairs -> OUT/embeddings.npy + OUT/ids.jsonl
  python experiments/embed.py --init_from=/work/runs/cpu_hour --input=shipped:peoples_daily \
      --out=/work/runs/emb_pd [--adapter=FT_WORKDIR/adapter] [--pooling=mean] [--limit=N]
  # 2. index: OUT/index.faiss (exact inner product = cosine)
  python experiments/embed.py --index --out=/work/runs/emb_pd
  # 3. search: the k nearest rows of each query text
  python experiments/embed.py --search --init_from=/work/runs/cpu_hour --out=/work/runs/emb_pd \
      --query="中共中央总书记江泽民" --k=5

--input: a .jsonl file, one record a line: {"id": ..., "text": ...} (text),
{"id": ..., "image": [[...]]} (an image of data.image_size pixels a side, values 0..1:
image), or both keys (image+text); or shipped:peoples_daily / shipped:digits (the shipped
paragraphs, or the digits with their first caption: image+text; shipped:digits_images
for the images alone). Other keys of a record are kept in ids.jsonl.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_INIT = flags.DEFINE_string("init_from", "", "The pretraining run (workdir or a checkpoint).")
_ADAPTER = flags.DEFINE_string("adapter", "", "A lora / prompt fine-tune's WORKDIR/adapter.")
_INPUT = flags.DEFINE_string("input", "", "A .jsonl file, or shipped:peoples_daily|digits.")
_OUT = flags.DEFINE_string("out", None, "Directory of embeddings.npy, ids.jsonl, index.faiss.")
_POOLING = flags.DEFINE_string("pooling", "mean", "mean | first | last | lexical | terms "
                               "(m6jax/embed/pooling.py; docs/finetuning.md says which won; "
                               "lexical / terms vectors are vocab-sized and more)")
_BATCH = flags.DEFINE_integer("batch", 256, "Rows per encoder call (sharded over devices).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Embed only the first N records (0 = all).")
_INDEX = flags.DEFINE_bool("index", False, "Build OUT/index.faiss from OUT/embeddings.npy.")
_SEARCH = flags.DEFINE_bool("search", False, "Search OUT/index.faiss for --query texts.")
_QUERY = flags.DEFINE_multi_string("query", [], "A query text (repeatable), for --search.")
_K = flags.DEFINE_integer("k", 5, "Neighbours per query.")
flags.mark_flags_as_required(["out"])


def _records(spec: str) -> list[dict]:
    from m6jax.data import corpora
    from m6jax.data.corpora import default_cache_dir
    if spec.startswith("shipped:"):
        name = spec.split(":", 1)[1]
        texts, images = corpora.shipped_corpora(default_cache_dir())
        if name == "peoples_daily":
            from m6jax.finetune.recall_data import load_paragraphs
            return [{"id": i, "text": t} for i, t in enumerate(load_paragraphs())]
        if name in ("digits", "digits_images"):
            with open(images[0], encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
            return [dict({"id": i, "image": r["image"], "label": r["label"]},
                         **({"text": r["caption"][0]} if name == "digits" else {}))
                    for i, r in enumerate(rows)]
        cli.refuse(f"flag error: --input={spec}: use shipped:peoples_daily, shipped:digits or "
                   "shipped:digits_images")
    if not os.path.isfile(spec):
        cli.refuse(f"flag error: --input={spec!r} is not a file; give a .jsonl file or "
                   "shipped:peoples_daily")
    with open(spec, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    import numpy as np
    from m6jax.embed import index

    out = os.path.abspath(_OUT.value)
    if _INDEX.value:
        t = time.time()
        idx = index.build(out)
        print(f"index of {idx.ntotal} vectors (dim {idx.d}) in {time.time() - t:.2f} s: "
              f"{os.path.join(out, 'index.faiss')}")
        return
    if not _INIT.value:
        cli.refuse("flag error: --init_from is empty; give the pretraining workdir")
    from m6jax.embed.api import Embedder
    try:
        emb = Embedder.load(_INIT.value, _ADAPTER.value, _POOLING.value, _BATCH.value)
    except ValueError as e:
        cli.refuse(f"config error: {e}")
    if _SEARCH.value:
        if not _QUERY.value:
            cli.refuse("flag error: --search needs at least one --query=TEXT")
        records, _ = index.read(out)
        scores, ids = index.search(out, emb.texts(list(_QUERY.value)), _K.value)
        for q, s_row, i_row in zip(_QUERY.value, scores, ids):
            print(f"query: {q}")
            for s, i in zip(s_row, i_row):
                r = records[i]
                print(f"  {s:.3f}  id={r.get('id')}  {str(r.get('text', ''))[:60]}")
        return
    if not _INPUT.value:
        cli.refuse("flag error: --input is empty; give a .jsonl file or shipped:peoples_daily")
    records = _records(_INPUT.value)[:_LIMIT.value or None]
    t = time.time()
    size = emb.config.data.image_size
    has_image, has_text = "image" in records[0], "text" in records[0]
    if has_image:
        imgs = [np.asarray(r["image"], np.float32) for r in records]
        imgs = [i[..., None] if i.ndim == 2 else i for i in imgs]
        if any(i.shape[:2] != (size, size) for i in imgs):
            cli.refuse(f"input error: --input images must be {size}x{size} (data.image_size of "
                       "the checkpoint)")
        patches = np.stack([emb.patchify(i) for i in imgs])
        vecs = (emb.image_texts(patches, [r["text"] for r in records]) if has_text
                else emb.images(patches))
    else:
        vecs = emb.texts([r["text"] for r in records])
    kept = [{k: v for k, v in r.items() if k != "image"} for r in records]
    index.write(out, kept, vecs)
    kind = "image+text" if has_image and has_text else "image" if has_image else "text"
    print(f"{len(records)} {kind} embeddings (dim {vecs.shape[1]}, pooling {_POOLING.value}) in "
          f"{time.time() - t:.1f} s: {out}/embeddings.npy + ids.jsonl", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
