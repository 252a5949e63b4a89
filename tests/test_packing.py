"""data.pack: examples packed into one row never see each other, and lose nothing."""
import flax.linen as nn
import jax
import numpy as np

from helpers import NUM_TASKS, tiny_config
from m6jax import sharding
from m6jax.data import packing, tasks
from m6jax.model import M6
from m6jax.model.masks import prefix_lm_mask
from m6jax.train.losses import text_loss

GRID, P, PATCH_DIM, T, EOS = 2, 4, 4, 24, 3


def _examples(seed=0):
    """Three rows of hand-made (task, prefix, target, patches) examples."""
    rng = np.random.default_rng(seed)

    def tok(n):
        return rng.integers(10, 60, n).tolist()

    image = rng.random((P, PATCH_DIM)).astype(np.float32)
    return [
        [(tasks.CAPTION, [4, 5], tok(5), image), (tasks.LM, [6], tok(7)), (tasks.DENOISE, [7] + tok(3), tok(4))],
        [(tasks.LM, [6], tok(9)), (tasks.CAPTION, [4, 5], tok(3), image * 0.5)],
        [(tasks.DENOISE, [7] + tok(4), tok(6))],
    ]


def _rows(examples):
    return [[e if len(e) == 4 else (*e, None) for e in row] for row in examples]


def _unpacked(rows):
    """Every example in a row of its own, the pipeline's unpacked layout."""
    flat = [e for row in rows for e in row]
    out = [tasks.pack(prefix, target, EOS, T) for _, prefix, target, _ in flat]
    batch = {k: np.stack([o[k] for o in out]) for k in out[0]}
    batch["patches"] = np.stack([p if p is not None else np.zeros((P, PATCH_DIM), np.float32)
                                 for *_, p in flat])
    batch["image_mask"] = np.repeat(np.array([p is not None for *_, p in flat])[:, None], P, 1)
    batch["task_id"] = np.array([t for t, *_ in flat], np.int32)
    return batch


def test_packed_rows_lay_examples_one_after_another_with_their_own_positions():
    rows = _rows(_examples())
    b = packing.pack_examples(rows, T, P, PATCH_DIM, EOS)
    # Row 0: caption (2 + 5 = 7 slots) then lm (8) then denoise (8); the image is the caption's.
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * P + [1] * 7 + [2] * 8 + [3] * 8 + [0] * 1)
    np.testing.assert_array_equal(b["text_positions"][0, :23], list(range(7)) + list(range(8)) + list(range(8)))
    # Row 1's image belongs to its second example.
    assert (b["segment_ids"][1, :P] == 2).all() and b["image_mask"][1].all()
    np.testing.assert_array_equal(b["token_task_id"][0, :7], [tasks.CAPTION] * 7)
    # Loss only on each example's own target + eos: 6 + 8 + 5 in row 0.
    assert b["loss_mask"][0].sum() == 6 + 8 + 5
    assert not b["text_is_prefix"][0, 2:7].any() and b["text_is_prefix"][0, 7]


def test_no_query_attends_to_another_example():
    b = packing.pack_examples(_rows(_examples()), T, P, PATCH_DIM, EOS)
    mask = np.asarray(prefix_lm_mask(b["image_mask"], b["text_mask"], b["text_is_prefix"],
                                     b["segment_ids"]))[:, 0]                   # [B, S, S]
    seg = b["segment_ids"]
    real_q = seg[:, :, None] > 0
    crosses = mask & real_q & (seg[:, :, None] != seg[:, None, :])
    assert not crosses.any()
    # Within an example the prefix-LM rule holds: the caption's text sees its image.
    assert mask[0, P, :P].all() and not mask[0, P + 7, :P].any()
    assert mask.any(-1).all(), "no softmax row may be empty (pad queries included)"


def test_packed_and_unpacked_losses_agree_per_example_and_task():
    c = tiny_config()
    c.data.text_len = T
    model = M6(c.model, GRID, T)
    rows = _rows(_examples())
    packed = packing.pack_examples(rows, T, P, PATCH_DIM, EOS)
    unpacked = _unpacked(rows)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        # Weights drawn in numpy from the init's shapes (compiling the init costs more
        # than the test); one compile for both layouts.
        abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), unpacked))["params"]
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: (0.2 * rng.normal(size=a.shape)).astype(np.float32), abstract)
        a, b = jax.device_get(jax.jit(lambda p, bs: [
            text_loss(model.apply({"params": p}, x), x, NUM_TASKS)[1] for x in bs])(
                params, (packed, unpacked)))
    assert a["tokens"] == b["tokens"] == 6 + 8 + 5 + 10 + 4 + 7
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(a["task_loss_sum"], b["task_loss_sum"], rtol=1e-5)
    np.testing.assert_array_equal(a["task_tokens"], b["task_tokens"])
    assert a["real_tokens"] == b["real_tokens"]  # the same real slots in fewer rows
    assert packing.pad_fraction(packed) < packing.pad_fraction(unpacked)
