"""Where image codes live in M6's vocabulary, and the text-to-image config checks.

Codes are appended to the text vocabulary rather than given an embedding and head of
their own: `model.vocab_size = data.vocab_size + K + 3`. Then the KV-cache decoder,
tied embeddings, the loss, the sharded `vocab` axis and the task mixing all work
unchanged, and caption and code tokens share one softmax (which the decoders restrict
to the code range). The cost is K + 3 more rows in the (tied) embedding, small next to
the text vocabulary. Layout after the text ids:
  [V, V + K)   the K codes       V + K      <code_mask> (masked-code objective)
  V + K + 1    <image>  (prefix symbol: codes follow autoregressively)
  V + K + 2    <image_mask>  (prefix symbol: masked codes are filled in parallel)
The image tokenizer's own three symbols sit here, not in the SentencePiece model, so
text tokenizers of existing runs stay valid.
"""
from __future__ import annotations

import dataclasses

NUM_SYMBOLS = 3
T2I_TASKS = ("text_to_image", "text_to_image_mask")


@dataclasses.dataclass(frozen=True)
class CodeVocab:
    text_vocab: int
    codebook_size: int
    num_codes: int  # codes per image

    @property
    def offset(self) -> int:
        return self.text_vocab

    @property
    def code_mask_id(self) -> int:
        return self.text_vocab + self.codebook_size

    @property
    def image_id(self) -> int:
        return self.code_mask_id + 1

    @property
    def image_mask_id(self) -> int:
        return self.code_mask_id + 2

    @property
    def size(self) -> int:
        return self.text_vocab + self.codebook_size + NUM_SYMBOLS

    def caption_slots(self, text_len: int) -> int:
        """Caption tokens a prompt holds: text_len = [symbol, lang] + caption + codes."""
        return text_len - 2 - self.num_codes


def enabled(config) -> bool:
    """True if the config's data.task_weights give a text_to_image task weight."""
    weights = dict(config.data.task_weights)
    return any(float(weights.get(t, 0.0)) > 0 for t in T2I_TASKS)


def vq_from(config) -> str:
    return config.vq_from or config.data.vq_from


def code_vocab(config) -> CodeVocab:
    """The layout for `config` (reads the tokenizer checkpoint's meta; no arrays)."""
    from m6jax.vq.load import vq_config
    from m6jax.vq.model import num_codes
    v = vq_config(vq_from(config)).vq
    return CodeVocab(int(config.data.vocab_size), int(v.codebook_size), num_codes(v))


def validate(config) -> None:
    """Refuses (naming the field) a text-to-image config without a tokenizer checkpoint,
    with a model vocabulary that does not hold its codebook, or a text_len too short."""
    cv = code_vocab(config)
    m = config.model
    if m.vocab_size != cv.size:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} does not hold the image codes: data.vocab_size="
            f"{cv.text_vocab} + the {cv.codebook_size}-code codebook of vq_from={vq_from(config)} "
            f"+ {NUM_SYMBOLS} image symbols = {cv.size}; set t2i.codebook_size="
            f"{cv.codebook_size} (model.vocab_size follows it)")
    if "t2i" in config and int(config.t2i.codebook_size) != cv.codebook_size:
        raise ValueError(f"t2i.codebook_size={config.t2i.codebook_size} differs from the "
                         f"{cv.codebook_size} codes of vq_from={vq_from(config)}")
    if cv.caption_slots(config.data.text_len) < 2:
        raise ValueError(f"data.text_len={config.data.text_len} cannot hold [symbol, lang], a "
                         f"caption and the {cv.num_codes} codes of an image; use at least "
                         f"{cv.num_codes + 2 + 8}")
