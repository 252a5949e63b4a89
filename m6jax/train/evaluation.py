"""Held-out evaluation: eval loss per task and digit-caption accuracy from greedy decoding."""
from __future__ import annotations

from collections import Counter

import jax
import numpy as np

from m6jax import distributed, sharding
from m6jax.generate import make_cached_greedy_decoder, pad_rows

LANGS = ("en", "zh")


def pad_batch(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Pads rows to a multiple of the batch shards; padded rows carry no loss."""
    keys = list(batch)
    arrays, n = pad_rows([batch[k] for k in keys], multiple)
    out = dict(zip(keys, arrays))
    if out["loss_mask"].shape[0] != n:
        out["loss_mask"] = out["loss_mask"].copy()
        out["loss_mask"][n:] = 0.0
    return out


class Evaluator:
    """Evaluates params on the pipeline's fixed held-out batches and digit images."""

    def __init__(self, pipe, model, mesh, param_shardings, eval_step, tasks,
                 caption_max_new: int = 12, decode_batch: int = 128, decode_params=None):
        """`eval_step` takes the params as the caller holds them (an offload plan's
        stored layout); `decode_params(params)` gives the decoder's canonical params
        (identity by default)."""
        self.pipe, self.mesh, self.tasks = pipe, mesh, tasks
        self.decode_params = decode_params or (lambda p: p)
        self.eval_step = eval_step
        self.shards = sharding.batch_shards(mesh)
        self.batches = [sharding.shard_full_batch(mesh, pad_batch(b, self.shards))
                        for b in pipe.eval_batches()]
        self.prompts = {lang: np.asarray(pipe.caption_prompt(lang), np.int32) for lang in LANGS}
        prompt_len = len(self.prompts["en"])
        if any(len(p) != prompt_len for p in self.prompts.values()):
            raise ValueError("caption prompts of all languages must have the same length")
        max_new = min(caption_max_new, pipe.text_len - prompt_len)
        self.decode = make_cached_greedy_decoder(model, mesh, param_shardings, prompt_len,
                                                 max_new, eos_id=pipe.tokenizer.eos_id)
        self.decode_batch = max(self.shards, decode_batch // self.shards * self.shards)

    def losses(self, params) -> dict[str, float]:
        """`eval_loss` (all held-out target tokens) and `eval_loss/<task>`."""
        totals = None
        with jax.set_mesh(self.mesh):
            for b in self.batches:
                aux = distributed.fetch(self.eval_step(params, b))
                totals = aux if totals is None else jax.tree.map(np.add, totals, aux)
        out = {"eval_loss": float(totals["loss_sum"] / max(totals["tokens"], 1.0))}
        for i, t in enumerate(self.tasks):
            if totals["task_tokens"][i] > 0:
                out[f"eval_loss/{t}"] = float(totals["task_loss_sum"][i] / totals["task_tokens"][i])
        return out

    def captions(self, params, patches, image_mask, lang: str) -> list[str]:
        """Greedy captions for images (patches f32 [N, P, patch_dim], image_mask [N, P])."""
        texts = []
        with jax.set_mesh(self.mesh):
            params = self.decode_params(params)
        for start in range(0, len(patches), self.decode_batch):
            p, m = patches[start:start + self.decode_batch], image_mask[start:start + self.decode_batch]
            prompt = np.repeat(self.prompts[lang][None], len(p), axis=0)
            (p, m, prompt), n = pad_rows([p, m, prompt], self.shards)
            b = sharding.shard_full_batch(self.mesh, dict(p=p, m=m, prompt=prompt))
            with jax.set_mesh(self.mesh):
                tokens = distributed.fetch(self.decode(params, b["p"], b["m"], b["prompt"]))
            tokens = np.asarray(tokens)
            texts += [self.pipe.tokenizer.decode(row.tolist()) for row in tokens[:n]]
        return texts

    def caption_accuracy(self, params) -> dict:
        """Exact match of the class word in greedy captions of the held-out digits.

        On data without digit labels there is no class word to match: the accuracies are
        None (n/a), `caption_overlap_f1` (character overlap with the record's own
        captions, per language present) is reported instead, and `examples` shows
        reference vs generated captions.
        """
        labels, refs, texts = [], [], {lang: {} for lang in LANGS}
        # Streamed: one chunk of held-out images in memory at a time (data.eval_records
        # bounds how many); a record is captioned in every language if labelled, else
        # in the languages of its own captions.
        for patches, image_mask, chunk_labels, chunk_refs in self.pipe.caption_eval_batches(
                self.decode_batch):
            for lang in LANGS:
                rows = [i for i, (y, r) in enumerate(zip(chunk_labels, chunk_refs))
                        if y >= 0 or any(l == lang for _, l in r)]
                if rows:
                    got = self.captions(params, patches[rows], image_mask[rows], lang)
                    texts[lang].update({len(labels) + i: t for i, t in zip(rows, got)})
            labels += [int(y) for y in chunk_labels]
            refs += chunk_refs
        labels = np.asarray(labels)
        if (labels < 0).all():
            return self._unlabelled(texts, refs)
        out = {}
        for lang in LANGS:
            pred = [self.pipe.caption_class(texts[lang].get(i, ""), lang) for i in range(len(labels))]
            out[f"caption_accuracy_{lang}"] = float(np.mean([p == y for p, y in zip(pred, labels)]))
        out["caption_accuracy"] = float(np.mean([out[f"caption_accuracy_{l}"] for l in LANGS]))
        out["examples"] = [f"digit {labels[i]}: en '{texts['en'].get(i, '')}' | zh "
                           f"'{texts['zh'].get(i, '')}'" for i in across_classes(labels, 8)]
        return out

    def _unlabelled(self, texts, refs, shown: int = 8) -> dict:
        out = {f"caption_accuracy{s}": None for s in ("", "_en", "_zh")}
        examples, f1 = [], []
        for lang in LANGS:
            rows = [i for i, r in enumerate(refs) if any(l == lang for _, l in r)]
            if not rows:  # no caption in this language: nothing to compare with
                continue
            pairs = [(i, texts[lang][i]) for i in rows]
            scores = [max(char_f1(t, c) for c, l in refs[i] if l == lang) for i, t in pairs]
            out[f"caption_overlap_f1_{lang}"] = float(np.mean(scores))
            f1 += scores
            examples += [f"{lang} reference '{next(c for c, l in refs[i] if l == lang)}' -> "
                         f"generated '{t}'" for i, t in pairs[:shown]]
        out["caption_overlap_f1"] = float(np.mean(f1))
        out["examples"] = examples
        return out


def across_classes(labels, n: int) -> list[int]:
    """Indices of up to `n` examples, one per class in turn (not the first n: the held-out
    order can start with several of one class)."""
    order, seen = [], {}
    for i, y in enumerate(labels):
        seen.setdefault(int(y), []).append(i)
    while len(order) < min(n, len(labels)):
        for idx in seen.values():
            if idx and len(order) < n:
                order.append(idx.pop(0))
    return order


def char_f1(generated: str, reference: str) -> float:
    """Character-unigram F1 (multiset overlap, spaces ignored): a language-agnostic overlap
    that needs no word segmentation for Chinese."""
    g, r = [c for c in generated if not c.isspace()], [c for c in reference if not c.isspace()]
    if not g or not r:
        return 0.0
    common = sum((Counter(g) & Counter(r)).values())
    if not common:
        return 0.0
    p, q = common / len(g), common / len(r)
    return 2 * p * q / (p + q)
