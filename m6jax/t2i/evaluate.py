"""How often the picture shows what was asked: t2i_accuracy and its references.

A digit classifier (an RBF SVM, scikit-learn) is fitted on the training split's images
at the tokenizer's size and scored on the held-out split (`t2i_classifier_accuracy`).
For each digit, `t2i.eval_samples_per_digit` images are generated from drawing prompts
(half zh "画一个数字七", half en "draw the digit seven"), decoded by the image tokenizer
and classified; t2i_accuracy (autoregressive) / t2i_accuracy_mask (parallel) is the
share classified as the digit asked for. Also: diversity (distinct code sequences per
prompt / samples), seconds per image of each decoder (compiled, one timed call over the
whole batch), and two baselines through the same classifier: uniformly random codes,
and the training image whose caption best matches the prompt (token Jaccard; an upper
reference: a real image of the right class whenever the caption names it).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from m6jax.data import captions as captions_lib
from m6jax.t2i import decode as decode_lib
from m6jax.t2i.images import save_grid

EVAL_TEMPLATES = {"zh": "画一个数字{}", "en": "draw the digit {}"}


def digit_prompt_texts(per_digit: int) -> tuple[list[str], list[str], np.ndarray]:
    texts, langs, labels = [], [], []
    for d in range(10):
        for i in range(per_digit):
            lang = ("zh", "en")[i % 2]
            texts.append(EVAL_TEMPLATES[lang].format(captions_lib.CLASS_WORDS[lang][d]))
            langs.append(lang)
            labels.append(d)
    return texts, langs, np.asarray(labels)


def make_decoders(config, model, code_examples):
    """{'ar': decode, 'mask': decode} from config.t2i; each decode(params, prompts, key)."""
    t, prompts, vocab = config.t2i, code_examples.prompts, code_examples.vocab
    ar = decode_lib.make_ar_decoder(
        model, vocab, temperature=t.temperature, top_k=t.top_k, top_p=t.top_p,
        guidance_scale=t.guidance_scale, uncond_prompt=np.asarray(prompts(None, None), np.int32))
    mask = decode_lib.make_mask_decoder(
        model, vocab, steps=t.mask_steps, temperature=t.mask_temperature, top_k=t.top_k,
        choice_temperature=t.choice_temperature, guidance_scale=t.guidance_scale,
        uncond_prompt=np.asarray(prompts(None, None, masked=True), np.int32))
    return dict(ar=ar, mask=mask)


def prompt_tokens(code_examples, texts, langs, masked: bool) -> np.ndarray:
    return np.asarray([code_examples.prompts(x, l, masked) for x, l in zip(texts, langs)], np.int32)


class DigitClassifier:
    """RBF SVM on the flattened tokenizer-size images of the training split."""

    def __init__(self, images):
        from sklearn.svm import SVC
        train, held = images.train, images.heldout
        y_train, y_held = images.labels(train), images.labels(held)
        keep = y_train >= 0
        self.svm = SVC(gamma="scale").fit(images.batch(train)[keep].reshape(keep.sum(), -1),
                                          y_train[keep])
        ok = y_held >= 0
        self.heldout_accuracy = float(np.mean(self.predict(images.batch(held)[ok]) == y_held[ok]))

    def predict(self, imgs: np.ndarray) -> np.ndarray:
        return self.svm.predict(imgs.reshape(len(imgs), -1))


def _timed(fn, *args):
    compiled = fn.lower(*args).compile()
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(compiled(*args)))
    return out, time.perf_counter() - t0


def _diversity(codes, labels, langs) -> float:
    groups = {}
    for c, y, l in zip(codes, labels, langs):
        groups.setdefault((int(y), l), set()).add(c.tobytes())
    sizes = {k: sum(1 for y, l in zip(labels, langs) if (int(y), l) == k) for k in groups}
    return float(np.mean([len(v) / sizes[k] for k, v in groups.items()]))


def nearest_caption_images(code_examples, texts) -> np.ndarray:
    """For each prompt, the training image whose caption shares the most tokens."""
    ce, pipe = code_examples, code_examples.pipe
    rows, cap_sets = [], []
    for row in pipe.images.train:
        record = pipe._image_record(row)
        if record is None:
            continue
        for cap in record[1]:
            rows.append(int(row))
            cap_sets.append(set(pipe.tokenizer.encode(cap)))
    out = []
    for text in texts:
        q = set(pipe.tokenizer.encode(text))
        scores = [len(q & c) / max(len(q | c), 1) for c in cap_sets]
        out.append(rows[int(np.argmax(scores))])
    return ce.images.batch(np.asarray(out))


def evaluate(config, model, mesh, params, pipe, workdir: str | None = None, seed: int = 0) -> dict:
    """The t2i_* numbers (see the module docstring); writes t2i_grid.png and
    t2i_grid_mask.png (a row per digit) into `workdir` when given."""
    from m6jax.vq.train import evaluate as vq_evaluate
    ce = pipe.t2i
    per_digit = int(config.t2i.eval_samples_per_digit)
    texts, langs, labels = digit_prompt_texts(per_digit)
    classifier = DigitClassifier(ce.images)
    decoders = make_decoders(config, model, ce)
    out = dict(t2i_classifier_accuracy=classifier.heldout_accuracy)
    key = jax.random.key(seed)
    with jax.set_mesh(mesh):
        for name, suffix in (("ar", ""), ("mask", "_mask")):
            prompts = prompt_tokens(ce, texts, langs, masked=name == "mask")
            codes, seconds = _timed(decoders[name], params, prompts, key)
            imgs = ce.image_tokenizer.decode(codes)
            out[f"t2i_accuracy{suffix}"] = float(np.mean(classifier.predict(imgs) == labels))
            out[f"t2i_diversity{suffix}"] = _diversity(codes, labels, langs)
            out[f"t2i_s_per_image{suffix}"] = seconds / len(codes)
            if workdir:
                cols = min(per_digit, 8)
                pick = np.concatenate([np.arange(d * per_digit, d * per_digit + cols) for d in range(10)])
                save_grid(os.path.join(workdir, f"t2i_grid{suffix}.png"), imgs[pick], cols, scale=2)
    rng = np.random.default_rng(seed)
    random_codes = rng.integers(0, ce.vocab.codebook_size, (len(labels), ce.vocab.num_codes))
    out["t2i_baseline_random_codes"] = float(np.mean(
        classifier.predict(ce.image_tokenizer.decode(random_codes)) == labels))
    out["t2i_baseline_nearest_caption"] = float(np.mean(
        classifier.predict(nearest_caption_images(ce, texts)) == labels))
    vq = vq_evaluate(ce.image_tokenizer.config, ce.image_tokenizer.variables,
                     ce.images.batch(ce.images.heldout))
    out.update(vq_psnr=vq["vq_psnr"], codebook_usage=vq["codebook_usage"],
               t2i_samples_per_digit=per_digit)
    return out

