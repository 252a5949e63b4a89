"""The text_to_image tasks' examples: caption prefix -> the image's codes.

Layout in the `text_len` text slots (image patches absent, image_mask all False):
  text_to_image       [<image>, lang, caption..pad] code_1 .. code_N  (+ eos target)
                      prefix bidirectional, codes causal: next-code prediction
  text_to_image_mask  [<image_mask>, lang, caption..pad] code or <code_mask> x N
                      all bidirectional; targets are the true codes at the masked
                      slots only (MaskGIT): a share cos(pi/2 * u), u ~ U(0, 1), masked
The caption is padded to a fixed number of slots (text_len - 2 - N) so that code i sits
at the same text position in both tasks, in every example and at generation time.
With probability data.caption_dropout the caption and lang become pad: the
unconditional model that classifier-free guidance subtracts.

Digit records (with a label) also get drawing prompts ("画一个数字七", "draw the digit
seven") among their captions: the shipped captions describe images, and a request is
phrased differently.
"""
from __future__ import annotations

import functools

import numpy as np

from m6jax.data import captions as captions_lib
from m6jax.data import tasks
from m6jax.errors import InputError
from m6jax.t2i import codes as codes_lib
from m6jax.t2i.vocab import T2I_TASKS, CodeVocab

GEN_TEMPLATES = {"zh": ("画一个数字{}", "画数字{}", "请画{}"),
                 "en": ("draw the digit {}", "draw a {}", "please draw {}")}


def for_pipeline(pipe, image_files, cache_dir):
    """CodeExamples for a Pipeline, or None if no text_to_image task is weighted."""
    weights = pipe.settings["task_weights"]
    if not any(float(weights.get(t, 0.0)) > 0 for t in T2I_TASKS):
        return None
    return CodeExamples(pipe, image_files, cache_dir)


def drawing_prompts(label: int) -> tuple[list[str], list[str]]:
    caps, langs = [], []
    for lang, templates in GEN_TEMPLATES.items():
        for t in templates:
            caps.append(t.format(captions_lib.CLASS_WORDS[lang][label]))
            langs.append(lang)
    return caps, langs


class Prompts:
    """Prompt token lists of the fixed length 2 + caption slots."""

    def __init__(self, tokenizer, vocab: CodeVocab, text_len: int):
        self.tok, self.vocab = tokenizer, vocab
        self.slots = vocab.caption_slots(text_len)
        self.length = 2 + self.slots

    def __call__(self, text: str | None, lang: str | None, masked: bool = False) -> list[int]:
        """text None = the unconditional prompt (caption dropped)."""
        symbol = self.vocab.image_mask_id if masked else self.vocab.image_id
        if text is None:
            return [symbol] + [self.tok.pad_id] * (self.length - 1)
        ids = self.tok.encode(text)[:self.slots]
        return [symbol, self.tok.lang_id(lang)] + ids + [self.tok.pad_id] * (self.slots - len(ids))


class CodeExamples:
    """Codes of every image-text record (read from data.codes_dir, else encoded once at
    start-up by the tokenizer in data.vq_from) and the two tasks' examples."""

    def __init__(self, pipe, image_files, cache_dir):
        from m6jax.vq.load import ImageTokenizer
        s = pipe.settings
        self.pipe, self.dropout = pipe, s["caption_dropout"]
        self._image_files, self._cache_dir = list(image_files), cache_dir
        self.image_tokenizer = ImageTokenizer(s["vq_from"], "data.vq_from")
        it = self.image_tokenizer
        self.vocab = CodeVocab(s["vocab_size"], it.codebook_size, it.num_codes)
        if self.vocab.caption_slots(pipe.text_len) < 2:
            raise InputError(f"data.text_len={pipe.text_len} cannot hold a prompt and the "
                             f"{it.num_codes} codes of an image")
        self.prompts = Prompts(pipe.tokenizer, self.vocab, pipe.text_len)
        if s["codes_dir"]:  # made once by experiments/encode_codes.py: no encoding here
            self.codes = codes_lib.StoredCodes(s["codes_dir"], pipe.images, it.num_codes,
                                               it.codebook_size)
            return
        if len(self.images.source) != len(pipe.images):
            raise InputError("data.image_text_files: the tokenizer's view of the records differs")
        self.codes = it.encode(self.images.batch(np.arange(len(self.images.source))))

    @functools.cached_property
    def images(self):
        """The records at the tokenizer's size (vq.data.TokenizerImages): built on first
        use (start-up encoding, or the t2i evaluation's classifier and references)."""
        from m6jax.vq.data import TokenizerImages
        it = self.image_tokenizer
        return TokenizerImages(self._image_files, it.image_size, it.channels, self._cache_dir)

    def record_prompts(self, record) -> tuple[list[str], list[str]]:
        _, caps, langs, label = record
        if 0 <= label <= 9:
            extra, extra_langs = drawing_prompts(label)
            caps, langs = caps + extra, langs + extra_langs
        return caps, langs

    def example(self, task: int, rng: np.random.Generator):
        """((packed arrays, as tasks.pack returns), None, None) for one training row."""
        for _ in range(100):
            row = self.pipe.images.train[rng.integers(len(self.pipe.images.train))]
            record = self.pipe._image_record(row)
            if record is not None:
                break
        else:
            raise InputError("text_to_image: 100 draws found no usable image-text record")
        caps, langs = self.record_prompts(record)
        k = rng.integers(len(caps))
        drop = rng.random() < self.dropout
        masked = task == tasks.TEXT_TO_IMAGE_MASK
        prompt = self.prompts(None if drop else caps[k], langs[k], masked)
        codes = self.codes[row]
        if not masked:
            return tasks.pack(prompt, (codes + self.vocab.offset).tolist(),
                              self.pipe.tokenizer.eos_id, self.pipe.text_len), None, None
        return pack_masked(prompt, codes, self.vocab, self.pipe.text_len, rng), None, None


def pack_masked(prompt: list[int], codes: np.ndarray, vocab: CodeVocab, text_len: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The masked-code example: a cosine-schedule share of the codes replaced by
    <code_mask>; loss on those slots only, whose targets are the true codes."""
    n = len(codes)
    num_masked = max(1, int(np.ceil(np.cos(np.pi / 2 * rng.random()) * n)))
    masked = np.zeros(n, bool)
    masked[rng.choice(n, num_masked, replace=False)] = True
    ids = codes + vocab.offset
    inputs = np.where(masked, vocab.code_mask_id, ids)
    p, used = len(prompt), len(prompt) + n
    out = {
        "text_tokens": np.zeros(text_len, np.int32), "targets": np.zeros(text_len, np.int32),
        "text_mask": np.zeros(text_len, bool), "text_is_prefix": np.zeros(text_len, bool),
        "loss_mask": np.zeros(text_len, np.float32),
    }
    out["text_tokens"][:p], out["text_tokens"][p:used] = prompt, inputs
    out["targets"][p:used] = ids
    out["text_mask"][:used] = True
    out["text_is_prefix"][:used] = True
    out["loss_mask"][p:used] = masked
    return out
