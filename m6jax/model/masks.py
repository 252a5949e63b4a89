"""Attention masks carried as what they are, so no [B, S, S] tensor exists unless the
XLA path asks for one.

`AttentionMask` (training, evaluation, a decode prefill) holds per-position vectors:
which slots are real tokens, which are in the prefix (seen bidirectionally: the image
patches and the source text), and the packed batch's segment ids. The rule (M6's
prefix-LM): key k is visible from query q iff k is a real token and (k is in the prefix
or k <= q), and, in a packed batch, a real query sees only keys of its own example.
`StepMask` (one KV-cache step) holds the cache's filled slots and the step's slot.

The XLA path builds the dense boolean from these (`dense`); the block-sparse path
gathers only its kept blocks (`visible` at static positions); the fused kernels take
segment ids (`kernel_segments`) and never see a mask tensor.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from m6jax.model.sparse import step_row

# The segment id the fused kernels give slots a call must keep apart from the real
# tokens (pads; non-prefix keys in the prefix call). Packed ids are >= 0.
NONE_SEGMENT = -1


@flax.struct.dataclass
class AttentionMask:
    """valid, prefix: bool [B, S]; segment_ids: i32 [B, S] (0 = pad) or None (one
    example per row)."""
    valid: jax.Array
    prefix: jax.Array
    segment_ids: jax.Array | None = None

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def visible(self, q_pos, k_pos):
        """bool [B, *shape]: key k_pos visible from query q_pos (static int arrays that
        broadcast to `shape`). Pad queries see what an unpacked row's would, so no
        softmax row is empty; their outputs are never used."""
        # Gathers at the un-broadcast positions ([S] per side for the dense mask, not
        # an [S, S] index array), broadcast by the ops; the comparison runs in the graph
        # (an [S, S] numpy constant would be embedded in the program).
        q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
        causal = jnp.asarray(k_pos) <= jnp.asarray(q_pos)
        out = self.valid[:, k_pos] & (self.prefix[:, k_pos] | causal[None])
        if self.segment_ids is not None:
            sq, sk = self.segment_ids[:, q_pos], self.segment_ids[:, k_pos]
            out &= (sq == sk) | (sq == 0)
        return jnp.broadcast_to(out, out.shape[:1] + causal.shape)

    def dense(self):
        """bool [B, 1, S, S], what jax.nn.dot_product_attention's XLA path takes."""
        s = np.arange(self.length)
        return self.visible(s[:, None], s[None, :])[:, None]

    def pad_to(self, length: int) -> "AttentionMask":
        """The same mask over `length` >= S slots; the new slots are invisible pads."""
        extra = length - self.length
        if not extra:
            return self
        pad = lambda a: jnp.pad(a, ((0, 0), (0, extra)))  # noqa: E731
        seg = None if self.segment_ids is None else pad(self.segment_ids)
        return AttentionMask(pad(self.valid), pad(self.prefix), seg)

    def kernel_segments(self):
        """(in_prefix bool [B, S], prefix_ids, causal_ids i32 [B, S]): the rule as two
        segment-id kernel calls. A query in the prefix takes the bidirectional call over
        `prefix_ids` (its keys: its example's real prefix slots); any other query takes
        the causal call over `causal_ids` (its example's real slots, k <= q). Exact when,
        within each example, every real prefix slot precedes every real target slot (M6's
        [image | source text | target text] order). Pads share NONE_SEGMENT, so every row
        sees at least itself and no kernel meets an empty softmax row."""
        base = (jnp.ones(self.valid.shape, jnp.int32) if self.segment_ids is None
                else self.segment_ids.astype(jnp.int32))
        in_prefix = self.valid & self.prefix
        prefix_ids = jnp.where(in_prefix, base, NONE_SEGMENT)
        causal_ids = jnp.where(self.valid, base, NONE_SEGMENT)
        return in_prefix, prefix_ids, causal_ids


@flax.struct.dataclass
class StepMask:
    """One KV-cache step: key_valid bool [B, L] (the cache's filled slots), slot i32 []
    (this query's slot), and the sparse pattern whose row it keeps (None = dense)."""
    key_valid: jax.Array
    slot: jax.Array
    pattern: object = flax.struct.field(pytree_node=False, default=None)

    def dense(self):
        """bool [B, 1, 1, L] over the cache slots."""
        m = self.key_valid[:, None, None, :]
        if self.pattern is None:
            return m
        return m & step_row(self.pattern, self.slot, self.key_valid.shape[1])


def attention_mask(image_mask, text_mask, text_is_prefix, segment_ids=None) -> AttentionMask:
    """The mask of a sequence [image patches | text].

    Args:
      image_mask: bool [B, P], True where an image patch exists.
      text_mask: bool [B, T], True on non-pad text tokens.
      text_is_prefix: bool [B, T], True on source text (seen bidirectionally).
      segment_ids: optional int32 [B, P+T] of a packed batch (`data.pack`): which example
        each slot belongs to, 0 = pad.
    """
    valid = jnp.concatenate([image_mask, text_mask], axis=1)
    prefix = jnp.concatenate([image_mask, text_is_prefix & text_mask], axis=1)
    return AttentionMask(valid, prefix, segment_ids)


def prefix_lm_mask(image_mask, text_mask, text_is_prefix, segment_ids=None):
    """bool [B, 1, P+T, P+T]: `attention_mask(...).dense()` (key k visible from query q
    iff k is a real token and (k is in the prefix or k <= q), within q's example)."""
    return attention_mask(image_mask, text_mask, text_is_prefix, segment_ids).dense()
