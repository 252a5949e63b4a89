"""SentencePiece tokenizer with M6's fixed special ids, trained once and cached.

Ids: pad=0, unk=1, bos=2, eos=3, then <caption>=4, <denoise>=5, <lm>=6, <mask>=7,
<zh>=8, <en>=9 (one id each), then 256 byte-fallback pieces, then learnt pieces.
"""
import collections
import io
import os
import re

from absl import logging

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TASK_SYMBOLS = ("<caption>", "<denoise>", "<lm>", "<mask>", "<zh>", "<en>")
NUM_RESERVED = 4 + len(TASK_SYMBOLS) + 256  # specials, task/lang symbols, byte pieces

# Bounds that keep training at a few seconds on 2 cores whatever the corpus size.
MAX_TRAIN_TEXTS = 20_000
MAX_TRAIN_CHARS = 300
CAPTION_LINES = 2_000


class Tokenizer:
    """Thin wrapper over a SentencePieceProcessor exposing the ids the tasks need."""

    def __init__(self, model_path: str):
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
        ids = [self.sp.piece_to_id(s) for s in TASK_SYMBOLS]
        if [self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()] + ids != list(range(10)):
            raise ValueError(f"data.tokenizer_path={model_path!r} was not trained by m6jax "
                             "(special ids differ); delete it or point to another path")
        (self.caption_id, self.denoise_id, self.lm_id,
         self.mask_id, self.zh_id, self.en_id) = ids

    def lang_id(self, lang: str) -> int:
        return {"zh": self.zh_id, "en": self.en_id}[lang]

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids, no bos/eos added. Unknown characters become byte pieces."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Ids -> text, stopping at the first eos and skipping pad/bos and non-text ids."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            # Ids past the text pieces are image codes (a text-to-image model's vocabulary
            # extends this one) or rows above a capped tokenizer's pieces: never text.
            if i not in (PAD_ID, BOS_ID) and i < self.vocab_size:
                out.append(i)
        return self.sp.decode(out)


def load_or_train(path: str, vocab_size: int, texts, captions) -> Tokenizer:
    """Loads the tokenizer at `path`, training it first if the file is missing.

    `texts` and `captions` are callables returning lists of strings, called only when
    training is needed (so a cached tokenizer costs no corpus reads).
    """
    if not os.path.exists(path):
        train(path, vocab_size, texts(), captions())
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size and _capped_from(path) != vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces but data.vocab_size="
                         f"{vocab_size}; delete the file or set data.tokenizer_path")
    return tok


def _capped_from(path: str) -> int | None:
    """The data.vocab_size a capped tokenizer was asked for (see `train`), or None."""
    try:
        with open(path + ".capped", encoding="utf-8") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def train(path: str, vocab_size: int, texts: list[str], captions: list[str]) -> None:
    """Trains a BPE model on a bounded sample of `texts` plus the captions; writes `path`.

    BPE rather than unigram: unigram took ~30 s on 20k Chinese lines here, BPE ~1 s.
    """
    rng = np.random.default_rng(0)
    if len(texts) > MAX_TRAIN_TEXTS:
        texts = [texts[i] for i in rng.choice(len(texts), MAX_TRAIN_TEXTS, replace=False)]
    lines = [t[:MAX_TRAIN_CHARS] for t in texts]
    # Captions are few but are half the training signal: repeat them so their words
    # become single pieces instead of drowning in the corpus.
    unique_caps = sorted(set(captions))[:CAPTION_LINES]
    lines += unique_caps * max(1, CAPTION_LINES // max(1, len(unique_caps)))
    lines = _drop_rare_chars(lines, keep=(vocab_size - NUM_RESERVED) * 2 // 3)
    model = io.BytesIO()
    pieces = vocab_size
    try:
        _train_bpe(lines, pieces, model)
    except RuntimeError as e:
        # A small corpus cannot fill the vocabulary: learn what it has, and keep the
        # model's vocab_size rows (the ids above the tokenizer's are never produced).
        most = re.search(r"value <= (\d+)", str(e))
        if not most or int(most.group(1)) < NUM_RESERVED + 1:
            raise ValueError(f"data.vocab_size={vocab_size}: sentencepiece training failed: "
                             f"{e}") from e
        pieces, model = int(most.group(1)), io.BytesIO()
        _train_bpe(lines, pieces, model)
        logging.warning("tokenizer: this corpus supports %d pieces, not data.vocab_size=%d; "
                        "trained %d (the model's extra rows stay unused; "
                        "--config.data.vocab_size=%d matches it)", pieces, vocab_size, pieces,
                        pieces)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if pieces != vocab_size:
        with open(path + ".capped", "w", encoding="utf-8") as f:
            f.write(str(vocab_size))
    tmp = f"{path}.tmp{os.getpid()}"  # rename so concurrent hosts never read half a file
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)


def _train_bpe(lines, vocab_size, model):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.9995, byte_fallback=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=list(TASK_SYMBOLS),
        # identity: keep full-width punctuation so decode(encode(x)) == x for Chinese.
        normalization_rule_name="identity",
        # No "▁" before every text: most texts are Chinese, where it is a wasted token.
        add_dummy_prefix=False,
        input_sentence_size=len(lines), num_threads=2, minloglevel=2)


def _drop_rare_chars(lines: list[str], keep: int) -> list[str]:
    # Chinese has thousands of characters; SentencePiece must give every character it
    # "covers" its own piece and refuses coverage below 0.98, which at vocab 4000 (or a
    # 300-piece test vocab) needs more pieces than exist. So only the `keep` most
    # frequent characters are shown to the trainer; the rest become spaces here and
    # byte-fallback pieces at encode time.
    counts = collections.Counter("".join(lines))
    counts.pop(" ", None)
    kept = {c for c, _ in counts.most_common(max(keep, 1))}
    return ["".join(c if c in kept or c == " " else " " for c in line) for line in lines]
