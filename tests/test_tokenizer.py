"""Specification of m6jax.data.tokenizer: fixed special ids, lossless round trips."""
import os

import pytest

from m6jax.data import captions, corpora
from m6jax.data import tokenizer as tokenizer_lib

VOCAB = 300


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    texts = [r["text"] for _, r in zip(range(1500), corpora._sentiment_records())]
    texts += [r["text"] for _, r in zip(range(1500), corpora._peoples_daily_records())]
    caps = [c for label in range(10) for c in captions.digit_captions(label)[0]]
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return tokenizer_lib.load_or_train(path, VOCAB, lambda: texts, lambda: caps)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.caption_id, tok.denoise_id, tok.lm_id, tok.mask_id, tok.zh_id, tok.en_id] == [4, 5, 6, 7, 8, 9]
    assert tok.vocab_size == VOCAB


def test_task_symbols_encode_to_single_ids(tok):
    assert tok.encode("<mask>") == [tok.mask_id]
    assert tok.encode("<caption>") == [tok.caption_id]


@pytest.mark.parametrize("text", [
    "手写数字七",
    "这本书很好看，推荐购买！质量不错。",
    "中共中央总书记、国家主席江泽民发表１９９８年新年讲话",
    "a handwritten digit seven",
    "Someone said: the number 42 is 'fine'.",
])
def test_encode_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_use_byte_fallback_not_unk(tok):
    ids = tok.encode("龘🙂")
    assert tok.unk_id not in ids
    assert tok.decode(ids) == "龘🙂"


def test_decode_stops_at_eos_and_skips_pad(tok):
    ids = tok.encode("the number two")
    assert tok.decode([0] + ids + [tok.eos_id] + tok.encode("junk") + [0, 0]) == "the number two"


def test_existing_model_is_reused_without_reading_corpus(tok):
    def fail():
        raise AssertionError("corpus read although the tokenizer exists")
    mtime = os.path.getmtime(tok.path)
    again = tokenizer_lib.load_or_train(tok.path, VOCAB, fail, fail)
    assert again.encode("手写数字七") == tok.encode("手写数字七")
    assert os.path.getmtime(tok.path) == mtime


def test_vocab_size_mismatch_names_the_field(tok):
    with pytest.raises(ValueError, match="data.vocab_size"):
        tokenizer_lib.load_or_train(tok.path, 4000, list, list)
