"""Sentiment fine-tune: review -> label word, scored by likelihood; TF-IDF baseline alongside.

Label words rather than a classification head: M6 is a generative prefix-LM whose
pretraining objective is next-token prediction, so classification as "which label word
is more likely after the prompt" reuses the pretrained output layer and loss unchanged
(no new parameters, nothing to initialise from scratch); it also keeps every task
a generation task, as M6 treats its downstream tasks.
"""
from __future__ import annotations

import time

import numpy as np

from m6jax.data.tokenizer import Tokenizer
from m6jax.finetune import baseline, loop, peft, scoring
from m6jax.finetune import sentiment_data as sd


def run(config, ft, pretrained, mesh, workdir: str) -> dict:
    """Fine-tunes on the train reviews and scores the held-out ones; returns the summary."""
    d = config.data
    num_patches = (d.image_size // d.patch_size) ** 2
    patch_dim = d.patch_size ** 2 * d.image_channels

    # ---- Data: the pretraining held-out reviews are the test set.
    texts, labels = sd.load_reviews()
    train_idx, test_idx = sd.split(texts)
    if ft.eval_reviews:  # a seeded subsample: the file lists all negatives first
        test_idx = np.sort(np.random.default_rng(0).permutation(test_idx)[:ft.eval_reviews])
    test_texts, test_labels = [texts[i] for i in test_idx], labels[test_idx]
    label_words = [w.strip() for w in ft.label_words.split(",")]
    if len(label_words) != 2:
        raise ValueError(f"label_words={ft.label_words!r} must name 2 words, negative first "
                         "(label 0), e.g. '差评,好评'")
    adaptation = peft.Adaptation.from_config(ft)
    # method=prompt: the learned slots go in front of each row, so rows leave them room.
    examples = sd.SentimentExamples(Tokenizer(pretrained.tokenizer_path),
                                    d.text_len - adaptation.prompt_length, label_words,
                                    ft.prompt_suffix)
    eval_rows = sd.scoring_rows(examples, test_texts, num_patches, patch_dim)

    # ---- Baseline on the same split.
    t = time.time()
    base_idx = train_idx
    if ft.baseline_train_reviews:
        base_idx = np.sort(np.random.default_rng(0).permutation(train_idx)[:ft.baseline_train_reviews])
    baseline_acc = baseline.tfidf_logreg_accuracy([texts[i] for i in base_idx], labels[base_idx],
                                                  test_texts, test_labels)
    baseline_s = time.time() - t

    # ---- Fine-tune the pretrained model, scoring the label words before and after.
    def batch_fn(step):
        return sd.train_batch(examples, texts, labels, train_idx, config.seed, step,
                              loop.host_rows(config), num_patches, patch_dim)

    model = loop.build_model(config)
    out = {}
    if ft.eval_before:
        params = loop.load_params(config, mesh, pretrained.step_dir)
        scorer = scoring.make_scorer(model, mesh, loop.shardings_of(params))
        before = scoring.score_rows(scorer, params, mesh, eval_rows, ft.score_batch)
        out["sentiment_accuracy_before_finetune"] = scoring.label_accuracy(
            before.reshape(len(test_idx), -1), test_labels)
        del params
    params, param_sh, stats = loop.finetune(config, mesh, batch_fn, ("sentiment",), workdir,
                                            pretrained.step_dir, name="sentiment",
                                            adaptation=adaptation)
    scorer = scoring.make_scorer(model, mesh, param_sh,
                                 adaptation if adaptation.method == "prompt" else None)
    scores = scoring.score_rows(scorer, params, mesh, eval_rows, ft.score_batch)
    accuracy = scoring.label_accuracy(scores.reshape(len(test_idx), -1), test_labels)
    return dict(
        sentiment_accuracy=accuracy, baseline_accuracy=baseline_acc, **out,
        majority_class_accuracy=float(max(np.mean(test_labels), 1 - np.mean(test_labels))),
        num_train_reviews=len(train_idx), num_test_reviews=len(test_idx),
        baseline_train_reviews=len(base_idx), baseline_s=baseline_s,
        label_words=label_words, method=adaptation.method, **stats)

