"""Two-tower text recall: M6 embeddings, contrastively fine-tuned, against TF-IDF.

Both towers are the same M6 (shared weights): query and document are each embedded
alone ([<lm>] + text, bidirectional, pooled: `m6jax.embed`). Fine-tuning is in-batch
symmetric InfoNCE (CLIP's loss): for B pairs, S = Q D^T / temperature [B, B] and the
loss is the mean of the row-wise and column-wise cross-entropies with the diagonal as
labels, so every other document of the global batch is a negative for a query and
vice versa. Evaluation (`recall_data`): one score matrix S [N, N] over the N eval pairs,
recall@1/5/10 query -> document (rows) and document -> query (columns); chance R@k is
k / N. `recall_rK` is the mean of the two directions; the TF-IDF baseline, the
pretrained embeddings and the fine-tuned ones are scored on the same N pairs.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m6jax.data.tokenizer import Tokenizer
from m6jax.embed import encoder, rows
from m6jax.embed.pooling import POOLINGS, pool
from m6jax.finetune import adapt_loop, loop, peft, scoring
from m6jax.finetune import recall_data as rd

KS = (1, 5, 10)


def recalls(scores_qc: np.ndarray, prefix: str) -> dict:
    """R@1/5/10 of an [N, N] matrix whose diagonal is the relevant pair, both directions."""
    relevant = np.eye(len(scores_qc), dtype=bool)
    out = {}
    for k in KS:
        q2d = scoring.recall_at_k(scores_qc, relevant, k)
        d2q = scoring.recall_at_k(scores_qc.T, relevant, k)
        out.update({f"{prefix}_r{k}": (q2d + d2q) / 2, f"{prefix}_r{k}_query_to_doc": q2d,
                    f"{prefix}_r{k}_doc_to_query": d2q})
    return out


def info_nce(q_bd, d_bd, temperature: float):
    """Symmetric in-batch InfoNCE of unit vectors q, d [B, D] -> (loss, in-batch top-1)."""
    s = (q_bd @ d_bd.T) / temperature                                              # [B, B]
    labels = jnp.arange(s.shape[0])
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(s, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(s.T, labels).mean())
    return loss, jnp.mean(jnp.argmax(s, axis=1) == labels)


def pair_loss(pooling: str, temperature: float):
    """loss_fn for adapt_loop: rows 2i / 2i + 1 of the batch are query / document i."""
    def loss_fn(logits, hidden, batch):
        valid = jnp.concatenate([batch["image_mask"], batch["text_mask"]], axis=1)
        v = pool(hidden, valid, batch["patches"].shape[1], pooling, logits,
                 batch["text_tokens"])
        loss, acc = info_nce(v[0::2], v[1::2], temperature)
        return loss, {"in_batch_top1": acc}
    return loss_fn


def _trim(r: dict) -> dict:
    """Drops the text columns no row uses (shorter rows are exact and cheaper)."""
    used = int(r["text_mask"].any(0).nonzero()[0].max()) + 1
    return {k: v[:, :used] if k.startswith("text_") else v for k, v in r.items()}


def run(config, ft, pretrained, mesh, workdir: str) -> dict:
    d = config.data
    num_patches, patch_dim = (d.image_size // d.patch_size) ** 2, d.patch_size ** 2 * d.image_channels
    adaptation = peft.Adaptation.from_config(ft)
    length = d.text_len - adaptation.prompt_length
    tok = Tokenizer(pretrained.tokenizer_path)
    train_pairs, eval_pairs = rd.split_pairs(rd.load_paragraphs(), ft.recall_candidates,
                                             ft.min_chars, ft.max_chars, ft.train_min_chars)
    queries, docs = [q for q, _ in eval_pairs], [t for _, t in eval_pairs]
    eval_rows = [_trim(rows.text_rows(tok, texts, length, num_patches, patch_dim))
                 for texts in (queries, docs)]

    # ---- Baseline: TF-IDF on the same queries and candidates (the better n-gram range).
    t = time.time()
    out = {}
    for n in (2, 3):
        out.update(recalls(rd.tfidf_scores(queries, docs, n), f"recall_tfidf{n}"))
    best = max((2, 3), key=lambda n: out[f"recall_tfidf{n}_r1"])
    out.update({k.replace(f"recall_tfidf{best}", "recall_baseline"): v
                for k, v in list(out.items()) if k.startswith(f"recall_tfidf{best}_")})
    out.update(recall_baseline=f"tfidf char 1-{best}-grams", baseline_s=time.time() - t)

    model = loop.build_model(config)

    def scores(params, adapt, poolings):
        enc = encoder.make_encoder(model, mesh, loop.shardings_of(params), adapt, poolings)
        q, c = (encoder.encode_rows(enc, params, mesh, r, ft.score_batch) for r in eval_rows)
        return {p: q[p] @ c[p].T for p in poolings}

    # ---- The pretrained embeddings, every pooling (the choice is made on these).
    base = loop.load_params(config, mesh, pretrained.step_dir)
    if ft.eval_before:
        for p, s in scores(({}, base), None, POOLINGS).items():
            r = recalls(s, "x")
            out.update({f"recall_pretrained_r{k}_{p}": r[f"x_r{k}"] for k in KS})
        out.update({f"recall_pretrained_r{k}": out[f"recall_pretrained_r{k}_{ft.pooling}"]
                    for k in KS})

    # ---- Contrastive fine-tuning of the two towers.
    def batch_fn(step):
        picks = rd.train_picks(len(train_pairs), config.seed, step, loop.host_rows(config))
        texts = [s for i in picks for s in train_pairs[i]]                 # q0, d0, q1, d1, ...
        return rows.text_rows(tok, texts, length, num_patches, patch_dim)

    step_base, trainable = adapt_loop.init_trainable(adaptation, base, mesh, config.seed)
    trainable, stats = adapt_loop.train(config, mesh, model, adaptation, step_base, trainable,
                                        batch_fn, pair_loss(ft.pooling, ft.temperature),
                                        workdir, name="recall")
    tuned = scores((step_base, trainable), adaptation, (ft.pooling,))[ft.pooling]
    out = {**recalls(tuned, "recall"), **out}
    out.update(peft.summary(adaptation, step_base, trainable, workdir, pretrained.step_dir))
    return dict(out, recall_candidates=len(eval_pairs), recall_chance_r1=1 / len(eval_pairs),
                num_train_pairs=len(train_pairs), pooling=ft.pooling,
                temperature=ft.temperature, method=ft.method, **stats)
