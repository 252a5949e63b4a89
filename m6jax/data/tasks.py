"""The pretraining tasks: token-level construction of one example.

Every example is prefix + target + [eos] in `text_len` slots:
  caption          prefix [<caption>, lang]                      target caption
  caption_denoise  prefix [<denoise>, lang, corrupted caption]   target caption
  denoise          prefix [<denoise>, corrupted text]            target text
  lm               prefix [<lm>]                                 target text
  text_to_image(_mask)  prefix [<image>, lang, caption]       target image codes
                       (built in m6jax/t2i/data.py; codes appended to the vocabulary)
Denoising replaces random spans (~noise_density of tokens, mean length mean_span)
with one <mask> each, T5-style.
"""
import numpy as np

from m6jax.data.config import TASK_NAMES

CAPTION, CAPTION_DENOISE, DENOISE, LM, TEXT_TO_IMAGE, TEXT_TO_IMAGE_MASK = range(len(TASK_NAMES))
T2I_TASKS = (TEXT_TO_IMAGE, TEXT_TO_IMAGE_MASK)
IMAGE_TASKS = (CAPTION, CAPTION_DENOISE)


def target_budget(task: int, text_len: int) -> int:
    """Most target tokens a task fits in text_len, leaving room for prefix and eos.

    text_tokens holds prefix + target (eos only ever appears in `targets`), so
    len(prefix) + len(target) <= text_len. Denoising sources are at most as long as
    their target, so each gets half of what the task and language tokens leave.
    """
    num_special = 2 if task in IMAGE_TASKS else 1
    room = text_len - num_special
    return room // 2 if task in (CAPTION_DENOISE, DENOISE) else room


def corrupt_spans(tokens: list[int], mask_id: int, noise_density: float, mean_span: float,
                  rng: np.random.Generator) -> list[int]:
    """Replaces random spans covering ~noise_density of `tokens` with one mask_id each.

    At least one token is masked and (if there are two or more) at least one kept.
    Kept runs before the first and after the last span may be empty, so a text's end
    is no more likely to be masked than its middle.
    """
    n = len(tokens)
    if n <= 1:
        return [mask_id] * n
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_keep = n - num_noise
    num_spans = min(max(int(round(num_noise / mean_span)), 1), num_noise, num_keep + 1)
    noise_lens = _partition(num_noise, num_spans, rng)
    keep_lens = _partition(num_keep + 2, num_spans + 1, rng)
    keep_lens[0] -= 1  # the two outer runs may be empty: composition of m+2, minus 1 each
    keep_lens[-1] -= 1
    out, pos = [], 0
    for keep, noise in zip(keep_lens[:-1], noise_lens):
        out += tokens[pos:pos + keep] + [mask_id]
        pos += keep + noise
    return out + tokens[pos:]


def _partition(total: int, parts: int, rng) -> list[int]:
    """A uniformly random split of `total` into `parts` positive integers."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def make_example(task: int, target: list[int], tok, lang: str | None, settings: dict,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(prefix, target) token lists for one example; `target` is already truncated."""
    lang_ids = [tok.lang_id(lang)] if task in IMAGE_TASKS else []
    if task == CAPTION:
        return [tok.caption_id] + lang_ids, target
    if task == LM:
        return [tok.lm_id], target
    source = corrupt_spans(target, tok.mask_id, settings["noise_density"], settings["mean_span"], rng)
    return [tok.denoise_id] + lang_ids + source, target


def pack(prefix: list[int], target: list[int], eos_id: int, text_len: int) -> dict[str, np.ndarray]:
    """Lays out s = prefix + target + [eos] as model inputs and next-token targets.

    Returns 1-D arrays of length text_len: text_tokens = s[:-1], targets = s[1:] (both
    0-padded), text_mask on real inputs, text_is_prefix on the prefix, and loss_mask
    wherever targets[i] belongs to target + eos (i >= len(prefix) - 1).
    """
    s = prefix + target + [eos_id]
    n = len(s) - 1
    if n > text_len or not prefix or not target:
        raise ValueError(f"example of {len(prefix)} prefix + {len(target)} target tokens "
                         f"does not fit data.text_len={text_len}")
    out = {
        "text_tokens": np.zeros(text_len, np.int32),
        "targets": np.zeros(text_len, np.int32),
        "text_mask": np.zeros(text_len, bool),
        "text_is_prefix": np.zeros(text_len, bool),
        "loss_mask": np.zeros(text_len, np.float32),
    }
    out["text_tokens"][:n] = s[:-1]
    out["targets"][:n] = s[1:]
    out["text_mask"][:n] = True
    out["text_is_prefix"][:len(prefix)] = True
    out["loss_mask"][len(prefix) - 1:n] = 1.0
    return out
