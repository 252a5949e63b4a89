"""Fine-tuning: scoring and recall, the TF-IDF baseline, the review split, and each task's
entry-point run from a tiny pretrained checkpoint."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from helpers import GRID, PATCH_DIM, TEXT_LEN, tiny_config

from m6jax import sharding
from m6jax.model import M6
from m6jax.data.corpora import default_cache_dir
from m6jax.data.sources import TextSource
from m6jax.finetune import baseline, retrieval, scoring
from m6jax.train import optim
from m6jax.train.state import create_train_state, dummy_batch
from m6jax.finetune import sentiment_data as sd


# ---- recall@k and label accuracy on hand-made scores -----------------------------------

def test_recall_at_k_counts_a_relevant_candidate_among_the_k_best():
    scores = np.array([[0.9, 0.1, 0.5],
                       [0.2, 0.8, 0.7]])
    relevant = np.array([[False, False, True],
                         [True, False, False]])
    # row 0 ranks 0, 2, 1 (relevant 2nd); row 1 ranks 1, 2, 0 (relevant 3rd)
    assert scoring.recall_at_k(scores, relevant, 1) == 0.0
    assert scoring.recall_at_k(scores, relevant, 2) == 0.5
    assert scoring.recall_at_k(scores, relevant, 3) == 1.0


def test_recall_ties_go_to_the_lower_candidate_index():
    scores = np.zeros((1, 3))
    assert scoring.recall_at_k(scores, np.array([[True, False, False]]), 1) == 1.0
    assert scoring.recall_at_k(scores, np.array([[False, True, False]]), 1) == 0.0


def test_retrieval_recalls_rank_both_directions_of_one_matrix():
    # 2 images x 2 captions, image i and caption i of class i. Image 1 prefers caption 0;
    # caption 0 prefers image 1; the other two queries rank their match first.
    scores = np.array([[-2.0, -3.0],
                       [-1.0, -2.0]])
    r = retrieval.recalls(scores, np.eye(2, dtype=bool))
    assert r["retrieval_r1_image_to_text"] == 0.5
    assert r["retrieval_r1_text_to_image"] == 0.5
    assert r["retrieval_r1"] == 0.5
    assert r["retrieval_r5"] == 1.0  # k beyond the candidates: every query hits


def test_label_accuracy_takes_the_higher_scoring_word():
    scores = np.array([[-2.0, -1.0], [-0.5, -4.0], [-3.0, -2.9]])
    assert scoring.label_accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)


# ---- the likelihood scorer on a tiny model, 8 devices -----------------------------------

def _tiny_model_and_params(devices):
    config = tiny_config(data=8)
    model = M6(config.model, GRID, TEXT_LEN)
    mesh = sharding.make_mesh(config.mesh, devices)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    state, shardings = create_train_state(
        model, tx, dummy_batch(config.batch_size, GRID * GRID, PATCH_DIM, TEXT_LEN), mesh, seed=0)
    return model, mesh, state.params, shardings.params


def test_scorer_sums_target_log_probs_and_picks_the_likelier_word(devices):
    from m6jax.data import tasks
    model, mesh, params, param_sh = _tiny_model_and_params(devices)
    prefix = [6, 20, 21, 22]
    words = [[30, 31], [40, 41]]
    packed = [tasks.pack(prefix, w, 3, TEXT_LEN) for w in words]
    rows = {k: np.stack([p[k] for p in packed]) for k in packed[0]}
    rows["patches"] = np.zeros((2, GRID * GRID, PATCH_DIM), np.float32)
    rows["image_mask"] = np.zeros((2, GRID * GRID), bool)
    scorer = scoring.make_scorer(model, mesh, param_sh)
    got = scoring.score_rows(scorer, params, mesh, rows, chunk=8)

    with jax.set_mesh(mesh):
        logits = jax.jit(model.apply)({"params": params}, {k: rows[k] for k in scoring._MODEL_KEYS})
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits), -1))
    want = [sum(logp[r, i, rows["targets"][r, i]] for i in range(TEXT_LEN) if rows["loss_mask"][r, i])
            for r in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert scoring.label_accuracy(got[None], np.array([int(np.argmax(want))])) == 1.0

    # Rows cut to their used length score the same (the model slices its position table).
    used = int(rows["text_mask"].sum(1).max())
    short = {k: (v[:, :used] if v.ndim == 2 and v.shape[1] == TEXT_LEN else v) for k, v in rows.items()}
    np.testing.assert_allclose(scoring.score_rows(scorer, params, mesh, short, chunk=8), got,
                               rtol=1e-4, atol=1e-4)


# ---- sentiment split and baseline on the real reviews ------------------------------------

@pytest.fixture(scope="module")
def reviews():
    texts, labels = sd.load_reviews()
    return texts, labels, *sd.split(texts)


def test_sentiment_test_split_is_what_pretraining_held_out(reviews):
    texts, _, train_idx, test_idx = reviews
    source = TextSource([os.path.join(default_cache_dir(), "corpora", "sentiment.jsonl")],
                        default_cache_dir())
    assert set(source.texts(source.heldout)) == {texts[i] for i in test_idx}
    assert not {texts[i] for i in train_idx} & {texts[i] for i in test_idx}
    assert 500 < len(test_idx) < 1000


def test_finetune_batches_draw_only_train_reviews(reviews):
    texts, _, train_idx, test_idx = reviews
    test_texts = {texts[i] for i in test_idx}
    picks = [i for step in range(50) for i in sd.train_picks(train_idx, 0, step, range(32))]
    assert not {texts[i] for i in picks} & test_texts
    assert len(set(picks)) > 1000  # really sampling, not one row


def test_tfidf_baseline_beats_chance_on_the_real_split(reviews):
    texts, labels, train_idx, test_idx = reviews
    sub = np.random.default_rng(0).permutation(train_idx)[:1000]
    acc = baseline.tfidf_logreg_accuracy([texts[i] for i in sub], labels[sub],
                                         [texts[i] for i in test_idx], labels[test_idx])
    majority = max(labels[test_idx].mean(), 1 - labels[test_idx].mean())
    assert acc > majority + 0.1


# ---- the entry point, from a tiny pretrained workdir -------------------------------------

TINY = ["--config.model.emb_dim=32", "--config.model.mlp_dim=64", "--config.model.num_layers=2",
        "--config.data.vocab_size=300", "--config.data.eval_examples=16"]
FT_TINY = ["--config.total_steps=3", "--config.log_every=3", "--config.batch_size=8",
           "--config.optimizer.warmup_steps=1", "--config.mesh.data=2"]
TASK_ARGS = {
    "sentiment": ["--config.eval_reviews=16", "--config.baseline_train_reviews=300"],
    "retrieval": ["--config.eval_images=6"],
    "caption": ["--config.total_steps=2", "--config.log_every=2", "--config.eval_before=false"],
    "recall": ["--config.recall_candidates=24", "--config.score_batch=16"],
    "sentiment_lora": ["--config.eval_reviews=16", "--config.baseline_train_reviews=300",
                       "--config.method=lora", "--config.eval_before=false"],
    "recall_prompt": ["--config.recall_candidates=24", "--config.method=prompt",
                      "--config.prompt.length=2", "--config.eval_before=false"],
}
KEYS = {"sentiment": ("sentiment_accuracy", "baseline_accuracy"),
        "retrieval": ("retrieval_r1", "retrieval_r5"),
        "caption": ("caption_accuracy_pretrained", "caption_accuracy_scratch"),
        "recall": ("recall_r1", "recall_r5", "recall_r10", "recall_baseline_r1",
                   "recall_pretrained_r1", "recall_candidates"),
        "sentiment_lora": ("sentiment_accuracy", "baseline_accuracy", "adapter_bytes", "base_bytes"),
        "recall_prompt": ("recall_r1", "recall_baseline_r1", "adapter_bytes", "base_bytes")}


def _run(script, args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrained")
    proc = _run("experiments/pretrain.py", ["--config=experiments/configs/m6.py:tiny", *TINY,
                "--config.total_steps=2", "--config.log_every=2", "--config.eval_every=2",
                "--config.batch_size=8", "--config.optimizer.warmup_steps=1",
                f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


# Slow: a tiny pretrain plus the three fine-tunes take ~2 min of CPU (5 min wall on the
# shared 2-core machine; 2m45s on a quieter moment), beyond the default suite's budget.
# Run: python -m pytest -q -m slow tests/test_finetune.py
@pytest.mark.slow
@pytest.mark.parametrize("task", ["sentiment", "retrieval", "caption", "recall", "sentiment_lora",
                                  "recall_prompt"])
def test_finetune_entry_point_writes_the_summary_keys(task, pretrained_workdir, tmp_path):
    workdir = pretrained_workdir
    config = task.split("_")[0]
    proc = _run("experiments/finetune.py", [f"--config=experiments/configs/finetune_{config}.py",
                f"--config.init_from={workdir}", *FT_TINY, *TASK_ARGS[task],
                f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    for key in KEYS[task]:
        assert key in summary, key
    _check_scores(task, summary)
    assert summary["mesh"]["data"] == 2
    assert f"fine-tune {config}" in proc.stdout


HELD_OUT_DIGITS = round(0.2 * 1797)  # sources.IMAGE_HOLDOUT_FRACTION of the shipped digits


def _is_count_of(fraction: float, n: int) -> bool:
    return abs(fraction * n - round(fraction * n)) < 1e-6


def _check_scores(task, s):
    """What each number is, not only its range: a fraction of the evaluated items."""
    if task.endswith(("_lora", "_prompt")):  # adapter-only checkpoints, small next to the base
        # The test model is 113 kB: rank 4 is 13% of it (cpu_hour: 2.1%, tests/test_finetune_peft.py)
        assert 0 < s["adapter_bytes"] < 0.25 * s["base_bytes"], s
        assert s["adapter_disk_bytes"] > 0
        task = task.split("_")[0]
    if task == "recall":  # 24 pairs: every recall is a count of 48 ranked queries
        assert s["recall_candidates"] == 24
        for key in ("recall_r1", "recall_baseline_r1", "recall_pretrained_r1"):
            if key in s:
                assert _is_count_of(s[key], 48), (key, s[key])
        assert s["recall_r1"] <= s["recall_r5"] <= s["recall_r10"]
    elif task == "sentiment":  # 16 test reviews (--config.eval_reviews=16)
        for key in ("sentiment_accuracy", "baseline_accuracy", "majority_class_accuracy"):
            assert _is_count_of(s[key], 16), (key, s[key])
        assert s["majority_class_accuracy"] >= 0.5
    elif task == "retrieval":  # 6 images: recall@5 can only add hits to recall@1
        assert s["num_images"] == 6
        assert s["retrieval_r1"] <= s["retrieval_r5"], s
    else:  # greedy captions of every held-out digit, in each language
        for key in ("pretrained", "scratch"):
            en, zh = s[f"caption_accuracy_{key}_en"], s[f"caption_accuracy_{key}_zh"]
            assert _is_count_of(en, HELD_OUT_DIGITS) and _is_count_of(zh, HELD_OUT_DIGITS)
            assert s[f"caption_accuracy_{key}"] == pytest.approx((en + zh) / 2, abs=1e-12)


def test_init_from_without_a_checkpoint_names_what_to_pass(tmp_path):
    proc = _run("experiments/finetune.py", ["--config=experiments/configs/finetune_sentiment.py",
                f"--config.init_from={tmp_path}", f"--workdir={tmp_path / 'w'}"])
    assert proc.returncode != 0
    assert "holds no checkpoint" in proc.stderr and "--config.init_from=PRETRAIN_WORKDIR" in proc.stderr
