"""Host-local batches for M6 pretraining; data order is a pure function of the step.

`Pipeline.batch(step)` draws every random choice of example row r of the global batch
(task, example, caption template, crop, denoising noise) from a Generator seeded with
(seed, step, r), and process i builds rows [i * B, (i + 1) * B): resuming at step k gives
bitwise the same batches with no iterator state to save beyond the step, and the global
batch is the same however many processes build it. Examples are drawn with replacement
from the train split.

Batch (B = batch_size // process_count, P = num_patches, T = text_len):
  patches         float32 [B, P, patch_size**2 * channels]  row-major patch grid; 0 if no image
  image_mask      bool    [B, P]   True where the example has an image
  text_tokens     int32   [B, T]   s[:-1] for s = prefix + target + [eos], 0-padded
  text_mask       bool    [B, T]   True on non-pad inputs
  text_is_prefix  bool    [B, T]   True on prefix inputs (bidirectional attention)
  targets         int32   [B, T]   s[1:], 0-padded
  loss_mask       float32 [B, T]   1 where targets[i] is part of target + eos
  task_id         int32   [B]      index into TASK_NAMES
With data.pack, rows hold several examples and three more arrays (see packing.py).
`loader.Loader` runs `batch` in worker processes and prefetches onto the devices.
"""
import os

import numpy as np
from absl import logging

from m6jax.data import captions, corpora, describe, images, packing, sources, tasks
from m6jax.data import loader as loader_lib
from m6jax.data import tokenizer as tokenizer_lib
from m6jax.data.corpora import default_cache_dir
from m6jax.data.config import (TASK_NAMES, TEXT_SUFFIXES, data_settings, expand_globs,
                               image_text_suffixes, task_probabilities)
from m6jax.errors import InputError
from m6jax.t2i import data as t2i_data

_MAX_DRAWS = 100  # redraws for an example whose text tokenizes to nothing


class Pipeline:
    """Data for one host: sources, tokenizer, train batches, eval batches."""

    def __init__(self, config, *, seed: int, batch_size: int, workdir: str,
                 process_index: int = 0, process_count: int = 1, cache_dir: str | None = None):
        s = self.settings = data_settings(config)
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.batch_size = batch_size // process_count
        self.task_names = TASK_NAMES
        self.task_probs = np.array(task_probabilities(s["task_weights"]))
        self.text_len, self.patch_size = s["text_len"], s["patch_size"]
        self.num_patches = (s["image_size"] // s["patch_size"]) ** 2
        self.patch_dim = s["patch_size"] ** 2 * s["image_channels"]
        self.num_skipped = 0  # examples redrawn because their text was empty
        # Image-text rows found unusable when drawn (a set: a row drawn twice counts once).
        self.bad_image_rows: set[int] = set()
        self.bad_messages: dict[int, str] = {}  # row -> why (file and record named)
        self._last_bad = ""

        cache_dir = cache_dir or default_cache_dir()
        text_files, image_files = s["text_files"], s["image_text_files"]
        # The user's files first: a bad one is refused before the shipped corpora load.
        text_files = text_files and expand_globs(text_files, "data.text_files", TEXT_SUFFIXES)
        image_files = image_files and expand_globs(image_files, "data.image_text_files",
                                                   image_text_suffixes(s))
        if not text_files or not image_files:
            shipped_text, shipped_images = corpora.shipped_corpora(cache_dir)
            text_files, image_files = text_files or shipped_text, image_files or shipped_images
        self.text = sources.TextSource(text_files, cache_dir, s["max_text_chars"])
        self.images = sources.ImageTextSource(image_files, cache_dir, s["image_size"], s["image_channels"],
                                              s["max_text_chars"], s["image_text_format"],
                                              process_index, process_count, s["eval_records"])

        path = s["tokenizer_path"] or os.path.join(workdir, "tokenizer.model")
        self.tokenizer = tokenizer_lib.load_or_train(
            path, s["vocab_size"], self._tokenizer_texts,
            lambda: self.images.all_captions(tokenizer_lib.CAPTION_LINES * 10))
        self._eval_examples = None
        # None unless a text_to_image task is weighted
        self.t2i = t2i_data.for_pipeline(self, image_files, cache_dir)

    def log_image_notice(self) -> None:
        """Logs what the first image-text record's image becomes (see data.describe)."""
        try:
            # The host's first training record: a shard it reads anyway.
            row = int(self.images.host_train[0])
            part = int(np.searchsorted(self.images.offsets, row, side="right")) - 1
            image = self.images.parts[part].row(row - int(self.images.offsets[part]))["image"]
            channels, hw = describe.source_image_info(image, self.images.base_dirs[part])
        except (OSError, ValueError, KeyError, TypeError):  # a bad first record: counted later
            return
        line, warning = describe.image_notice(channels, hw, self.settings)
        logging.info(line)
        if warning:
            logging.warning(warning)

    def _tokenizer_texts(self):
        train = self.text.train
        n = min(len(train), tokenizer_lib.MAX_TRAIN_TEXTS)
        return self.text.texts(np.sort(np.random.default_rng(0).choice(train, n, replace=False)))

    # ---- training batches ------------------------------------------------------------

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of the global batch for `step` (a pure function of seed, step
        and the row's global index, so independent of the number of processes)."""
        if self.settings["pack"]:
            return packing.pack_examples(packing.packed_rows(self, step), self.text_len,
                                         self.num_patches, self.patch_dim, self.tokenizer.eos_id)
        first = self.process_index * self.batch_size
        task_ids, examples = [], []
        for row in range(first, first + self.batch_size):
            rng = np.random.default_rng([self.seed, step, row])
            task = int(rng.choice(len(TASK_NAMES), p=self.task_probs))
            task_ids.append(task)
            examples.append(self.train_example(task, rng))
        return self._collate(examples, task_ids)

    def loader(self, start: int, stop: int, place=None) -> "loader_lib.Loader":
        """Batches of steps start..stop-1 from data.num_workers processes, prefetched."""
        return loader_lib.Loader(self, start, stop, place)

    def counters(self) -> dict:
        """Bad-data counts so far: `bad_records` = texts refused at load + bad image rows."""
        return dict(bad_records=(self.text.num_bad + self.images.num_malformed
                                 + len(self.bad_image_rows)),
                    bad_image_rows=sorted(int(r) for r in self.bad_image_rows),
                    skipped_empty_examples=self.num_skipped)

    def restore_counters(self, counters: dict) -> None:
        """Counts saved in a checkpoint (`counters()`), so metrics continue across restarts."""
        self.bad_image_rows |= set(counters.get("bad_image_rows", []))
        self.num_skipped = max(self.num_skipped, int(counters.get("skipped_empty_examples", 0)))

    def _image_record(self, row, rng=None):
        """`images.record(row, rng)`, or None (counted, logged once) if the record is bad."""
        try:
            return self.images.record(row, rng)
        except sources.BadRecord as e:
            if row not in self.bad_image_rows:
                logging.warning("skipping bad image-text record: %s", e)
                self.bad_messages[int(row)] = str(e)
            self.bad_image_rows.add(int(row))
            self._last_bad = str(e)
            return None

    def train_example(self, task, rng, text_len=None):
        """(prefix, target, patches) of one example of `task` (packing fills rows with
        these, `text_len` capping its text), or a text-to-image example."""
        if task in tasks.T2I_TASKS:
            return self.t2i.example(task, rng)
        budget = tasks.target_budget(task, text_len or self.text_len)
        for _ in range(_MAX_DRAWS):
            patches, lang = None, None
            if task in tasks.IMAGE_TASKS:
                row = self.images.host_train[rng.integers(len(self.images.host_train))]
                record = self._image_record(row, rng)
                if record is None:
                    continue  # a redraw from the same rng: order stays a function of the step
                image, caps, langs, _ = record
                k = rng.integers(len(caps))
                target, lang = self.tokenizer.encode(caps[k])[:budget], langs[k]
                patches = images.patchify(image, self.patch_size)
            else:
                row = self.text.train[rng.integers(len(self.text.train))]
                ids = self.tokenizer.encode(self.text.texts([row])[0])
                # A random window rather than the start: long paragraphs would
                # otherwise only ever show their first ~text_len tokens.
                start = rng.integers(len(ids) - budget + 1) if len(ids) > budget else 0
                target = ids[start:start + budget]
            if target:
                prefix, target = tasks.make_example(task, target, self.tokenizer, lang, self.settings, rng)
                return prefix, target, patches
            self.num_skipped += 1
        if task in tasks.IMAGE_TASKS and self.bad_image_rows:
            raise InputError(f"{_MAX_DRAWS} draws for task {TASK_NAMES[task]!r} found no usable "
                             f"record in data.image_text_files={', '.join(self.images.files)} "
                             f"({len(self.bad_image_rows)} bad so far; last: {self._last_bad})")
        raise InputError(f"{_MAX_DRAWS} draws for task {TASK_NAMES[task]!r} all gave empty text; "
                         "check data.text_files / data.image_text_files")

    def _collate(self, examples, task_ids, loss_weights=None):
        # text_to_image examples arrive packed (their own layout: m6jax/t2i/data.py).
        rows = [p if isinstance(p, dict) else tasks.pack(p, t, self.tokenizer.eos_id, self.text_len)
                for p, t, _ in examples]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["patches"] = np.zeros((len(examples), self.num_patches, self.patch_dim), np.float32)
        batch["image_mask"] = np.zeros((len(examples), self.num_patches), bool)
        for i, (_, _, patches) in enumerate(examples):
            if patches is not None:
                batch["patches"][i], batch["image_mask"][i] = patches, True
        batch["task_id"] = np.asarray(task_ids, np.int32)
        if loss_weights is not None:
            batch["loss_mask"] *= np.asarray(loss_weights, np.float32)[:, None]
        return batch

    # ---- evaluation ------------------------------------------------------------------

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """Fixed held-out batches: digit captions (zh and en) and corpus text (lm).

        data.eval_examples examples in all, half captions, in global batches of
        batch_size * process_count rows that every host builds whole (the evaluator
        places each device's rows with `sharding.shard_full_batch`), so the eval loss
        does not depend on the number of processes; padding slots repeat real examples
        with loss_mask 0.
        """
        if self._eval_examples is None:
            self._eval_examples = self._build_eval_examples()
        shard, size = self._eval_examples, self.batch_size * self.process_count
        num_batches = -(-len(shard) // size)
        padded = [shard[i % len(shard)] for i in range(num_batches * size)]
        weights = [1.0 if i < len(shard) else 0.0 for i in range(len(padded))]
        out = []
        for b in range(0, len(padded), size):
            chunk = padded[b:b + size]
            out.append(self._collate([e[1:] for e in chunk], [e[0] for e in chunk], weights[b:b + size]))
        return out

    def _build_eval_examples(self):
        total = self.settings["eval_examples"]
        examples, cap_budget = [], tasks.target_budget(tasks.CAPTION, self.text_len)
        for i, row in enumerate(self.images.heldout):
            if len(examples) >= total // 2:
                break
            record = self._image_record(row)
            if record is None:
                continue
            image, caps, langs, _ = record
            patches = images.patchify(image, self.patch_size)
            for lang in dict.fromkeys(langs):  # each language once, in file order
                options = [c for c, l in zip(caps, langs) if l == lang]
                target = self.tokenizer.encode(options[i % len(options)])[:cap_budget]
                if target and len(examples) < total // 2:
                    examples.append((tasks.CAPTION, self.caption_prompt(lang), target, patches))
        lm_budget = tasks.target_budget(tasks.LM, self.text_len)
        for text in self.text.texts(self.text.heldout[:total - len(examples)]):
            target = self.tokenizer.encode(text)[:lm_budget]
            if target:
                examples.append((tasks.LM, [self.tokenizer.lm_id], target, None))
        return examples

    def caption_eval_batches(self, size: int):
        """The held-out images, decoded `size` usable records at a time (at most
        data.eval_records in all): yields (patches [n, P, D] f32, image_mask [n, P] bool,
        labels [n] i32 (-1 without a `label` field), per record [(caption, lang), ...])."""
        chunk, found = [], 0
        for row in self.images.heldout:
            record = self._image_record(row)
            if record is not None:
                chunk.append(record)
                found += 1
            if chunk and (len(chunk) == size or row == self.images.heldout[-1]):
                patches = np.stack([images.patchify(r[0], self.patch_size) for r in chunk])
                yield (patches, np.ones(patches.shape[:2], bool),
                       np.array([r[3] for r in chunk], np.int32),
                       [list(zip(r[1], r[2])) for r in chunk])
                chunk = []
        if not found:
            raise InputError(f"data.image_text_files={', '.join(self.images.files)}: no usable "
                             f"held-out record ({len(self.images.heldout)} all bad; last: "
                             f"{self._last_bad})")

    def caption_eval_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All held-out images at once: patches [N, P, D] f32, image_mask [N, P] bool,
        labels [N] i32 (the chunks of `caption_eval_batches`, joined)."""
        chunks = list(self.caption_eval_batches(len(self.images.heldout)))
        return tuple(np.concatenate([c[k] for c in chunks]) for k in range(3))

    def heldout_captions(self) -> list[list[tuple[str, str]]]:
        """(caption, lang) pairs of each usable held-out record, in caption_eval_set order."""
        return [refs for c in self.caption_eval_batches(256) for refs in c[3]]

    def caption_langs(self, limit: int = 500) -> set[str]:
        """Languages among the captions of the first `limit` records of each image-text
        file (no image is decoded)."""
        langs = set()
        for part in self.images.parts:
            for i in range(min(limit, len(part))):
                try:
                    rec = part.row(i)
                except (OSError, ValueError, KeyError):
                    continue
                raw, lang = rec.get("caption"), rec.get("lang")
                caps = [raw] if isinstance(raw, str) else list(raw or [])
                if lang is None:
                    langs.update(captions.detect_lang(c) for c in caps if isinstance(c, str))
                else:
                    langs.update([lang] if isinstance(lang, str) else lang)
        return langs & set(captions.LANGS)

    def caption_prompt(self, lang: str) -> list[int]:
        """Prefix tokens that ask for a caption in `lang` ('zh' or 'en')."""
        return [self.tokenizer.caption_id, self.tokenizer.lang_id(lang)]

    @staticmethod
    def caption_class(text: str, lang: str) -> int | None:
        """Digit class named by a generated caption, None unless exactly one is named."""
        return captions.caption_class(text, lang)

