"""The two-tower recall task (m6jax/finetune/recall.py, recall_data.py) and the embedding
pooling (m6jax/embed/pooling.py), against hand-worked values."""
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.embed.pooling import BIGRAM_BUCKETS, pool
from m6jax.finetune import recall
from m6jax.finetune import recall_data as rd


def test_info_nce_is_the_mean_of_both_directions_cross_entropies():
    q = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    d = np.array([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]], np.float32)
    s = q @ d.T / 0.5
    rows = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in range(3)])
    cols = np.mean([np.log(np.exp(s[:, i]).sum()) - s[i, i] for i in range(3)])
    loss, top1 = recall.info_nce(jnp.asarray(q), jnp.asarray(d), 0.5)
    np.testing.assert_allclose(loss, (rows + cols) / 2, rtol=1e-5)
    assert rows != pytest.approx(cols)  # the case tells the two directions apart
    assert float(top1) == pytest.approx(1 / 3)  # only query 1 has its document on top


def test_recalls_rank_queries_over_documents_and_back():
    # q0 -> d0 (hit at 1); q1 -> d0 above d1 (hit at 2); q2 -> d2 at 1.
    s = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.7]], np.float32)
    r = recall.recalls(s, "x")
    assert r["x_r1_query_to_doc"] == pytest.approx(2 / 3)
    # Columns: d0 ranks q0 (0.9) first; d1 ranks q1 (0.5) first; d2 ranks q2 first.
    assert r["x_r1_doc_to_query"] == pytest.approx(1.0)
    assert r["x_r1"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["x_r5_query_to_doc"] == 1.0


def test_mean_pooling_averages_only_valid_positions_and_normalises():
    h = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)       # P = 1, T = 3
    valid = np.array([[True, True, False, False], [False, True, True, True]])
    got = np.asarray(pool(jnp.asarray(h), jnp.asarray(valid), 1, "mean"))
    want = np.stack([h[0, :2].mean(0), h[1, 1:].mean(0)])
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)


def test_first_last_and_lexical_pooling():
    h = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)  # P = 2, T = 3
    valid = np.array([[True, True, True, True, False], [False, False, True, True, True]])
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(pool(h, valid, 2, "first"), unit(h[:, 2]), rtol=1e-5)
    np.testing.assert_allclose(pool(h, valid, 2, "last"), unit(np.stack([h[0, 3], h[1, 4]])),
                               rtol=1e-5)
    logits = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    logits[0, 2] = 5.0  # a padding position's logits would win every max
    w = np.log1p(np.maximum(logits, 0))
    want = np.stack([w[0, :2].max(0), w[1].max(0)])  # row 0: text positions 0, 1 valid
    np.testing.assert_allclose(pool(h, valid, 2, "lexical", logits), unit(want), rtol=1e-5)


def test_terms_pooling_weighs_each_held_token_and_adjacent_pair_by_a_per_token_loop():
    rng = np.random.default_rng(2)
    vocab, num_patches = 6, 1
    tokens = np.array([[1, 3, 4, 3, 0], [2, 5, 5, 2, 1]], np.int32)  # [B, T]; row 0 pads at 4
    text_valid = np.array([[True, True, True, True, False], [True] * 5])
    valid = np.concatenate([np.zeros((2, num_patches), bool), text_valid], axis=1)
    logits = rng.normal(size=(2, 5, vocab)).astype(np.float32)
    logits[0, 4, 0] = 9.0  # a padding position's weight would win its entry
    h = np.zeros((2, num_patches + 5, 3), np.float32)
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    want = np.zeros((2, vocab + BIGRAM_BUCKETS), np.float32)
    for b in range(2):
        held = [i for i in range(1, 5) if text_valid[b, i]]  # position 0: the task token
        w = {i: softplus(logits[b, i, tokens[b, i]]) for i in held}
        for i in held:
            want[b, tokens[b, i]] = max(want[b, tokens[b, i]], w[i])
            if i + 1 in w:
                k = vocab + (tokens[b, i] * vocab + tokens[b, i + 1]) % BIGRAM_BUCKETS
                want[b, k] = max(want[b, k], np.sqrt(w[i] * w[i + 1]))
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = pool(h, valid, num_patches, "terms", logits, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert want[1, 2] > 0 and want[0, 1] == 0  # row 1 holds token 2 again at 3; row 0's 1 is the task token


@pytest.fixture(scope="module")
def paragraphs():
    return rd.load_paragraphs()


def test_recall_split_keeps_eval_halves_out_of_training(paragraphs):
    train, evals = rd.split_pairs(paragraphs, 300, 40, 100, 20)
    assert len(evals) == 300 and len(train) > 5000
    texts = set(paragraphs)
    for q, d in evals:
        assert q + d in texts and 40 <= len(q + d) <= 100 and abs(len(q) - len(d)) <= 1
    taken = {s for pair in evals for s in pair}
    assert not any(q in taken or d in taken for q, d in train)
    assert len(set(paragraphs)) == len(paragraphs)  # de-duplicated


def test_tfidf_recall_is_far_above_chance_on_the_shipped_task(paragraphs):
    _, evals = rd.split_pairs(paragraphs, 300, 40, 100, 20)
    s = rd.tfidf_scores([q for q, _ in evals], [d for _, d in evals], 2)
    assert recall.recalls(s, "x")["x_r1"] > 10 / 300
