"""Text-to-image decoding: cached == uncached autoregressive codes, seeded MaskGIT,
the masked-code example, and bad configs refused before compiling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import m6_t2i
from helpers import tiny_config
from m6jax import sharding
from m6jax.config_checks import validate_config
from m6jax.errors import InputError
from m6jax.t2i import decode as decode_lib
from m6jax.t2i.data import pack_masked
from m6jax.t2i.vocab import CodeVocab
from m6jax.model.build import build_model
from m6jax.train.state import dummy_batch

VOCAB = CodeVocab(text_vocab=64, codebook_size=16, num_codes=16)
TEXT_LEN = 2 + 6 + 16  # [symbol, lang] + 6 caption slots + 16 codes
B = 4


def _model(attention):
    c = tiny_config()
    c.data.image_size, c.data.patch_size, c.data.text_len = 4, 2, TEXT_LEN  # 4 patches
    c.model.vocab_size = VOCAB.size
    c.model.update(attention=attention, sparse_block_size=4, sparse_window=1, sparse_stride=3,
                   sparse_global_blocks=1)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = build_model(c)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_batch(1, 4, 4, TEXT_LEN))["params"])
    rng = np.random.default_rng(0)  # random params: compiling init costs more than the test
    params = jax.tree.map(lambda a: jnp.asarray(np.ones(a.shape) if a.ndim == 1 else
                                                rng.normal(0.0, 0.3, a.shape), a.dtype),
                          nn.meta.unbox(abstract))
    return model, mesh, params


def _prompts(masked=False):
    sym = VOCAB.image_mask_id if masked else VOCAB.image_id
    rng = np.random.default_rng(1)
    caps = rng.integers(10, 64, (B, 6))
    return np.concatenate([np.full((B, 1), sym), np.full((B, 1), 8), caps], 1).astype(np.int32)


# sparse in the default suite: it also checks the decode step's pattern row (m6.py).
@pytest.mark.parametrize("attention", [pytest.param("dense", marks=pytest.mark.slow), "sparse"])
def test_cached_autoregressive_codes_equal_uncached(attention):
    model, mesh, params = _model(attention)
    uncond = np.asarray([VOCAB.image_id] + [0] * 7, np.int32)
    kw = dict(temperature=1.0, top_k=6, guidance_scale=2.0, uncond_prompt=uncond,
              return_logits=True)
    key = jax.random.key(3)
    with jax.set_mesh(mesh):
        cached, logits = decode_lib.make_ar_decoder(model, VOCAB, **kw)(params, _prompts(), key)
        ref, ref_logits = decode_lib.make_uncached_ar_decoder(model, VOCAB, **kw)(
            params, _prompts(), key)
    cached, ref = np.asarray(cached), np.asarray(ref)
    assert cached.shape == (B, 16) and cached.min() >= 0 and cached.max() < 16
    assert len({r.tobytes() for r in cached}) > 1  # sampling: rows differ, so equality says something
    np.testing.assert_array_equal(cached, ref)
    # The logits too: a sampled code hides small differences (the Gumbel argmax rarely moves).
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-4)


def test_mask_decoding_is_reproducible_with_a_seed():
    model, mesh, params = _model("dense")
    decode = decode_lib.make_mask_decoder(model, VOCAB, steps=2, temperature=1.0,
                                          choice_temperature=4.5)
    with jax.set_mesh(mesh):
        a, b, c = (np.asarray(decode(params, _prompts(masked=True), jax.random.key(s)))
                   for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < VOCAB.codebook_size  # every slot filled, no mask left


def test_mask_schedule_is_cosine_and_fills_every_slot():
    assert decode_lib.mask_schedule(4, 16) == [14, 11, 6, 0]  # floor(16 cos(pi/2 t/4))
    assert decode_lib.mask_schedule(16, 16) == list(range(15, -1, -1))  # >= 1 filled a step


def test_masked_example_scores_only_masked_slots_against_true_codes():
    codes = np.arange(16) % VOCAB.codebook_size
    prompt = [VOCAB.image_mask_id, 8, 20, 21, 0, 0, 0, 0]
    ex = pack_masked(prompt, codes, VOCAB, TEXT_LEN, np.random.default_rng(0))
    slots = slice(8, 24)
    masked = ex["text_tokens"][slots] == VOCAB.code_mask_id
    assert masked.any() and (ex["loss_mask"][slots] == masked).all() and ex["loss_mask"][:8].sum() == 0
    np.testing.assert_array_equal(ex["targets"][slots], codes + VOCAB.offset)
    np.testing.assert_array_equal(ex["text_tokens"][slots][~masked], (codes + VOCAB.offset)[~masked])
    assert ex["text_is_prefix"][:24].all()  # bidirectional everywhere


# ---- bad input, refused by the config checks (before anything compiles) --------------

@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    """An (untrained) tokenizer checkpoint of 32 codes: what the checks read."""
    from configs import vq as vq_config
    from m6jax import checkpoint
    c = vq_config.get_config("tiny")
    c.vq.update(image_size=16, codebook_size=32)
    d = str(tmp_path_factory.mktemp("vq"))
    shapes = jax.eval_shape(lambda: dict(params={"w": jnp.zeros(2)}))
    ckpt = checkpoint.Checkpointer(d, c)
    ckpt.save(1, jax.tree.map(lambda a: jnp.zeros(a.shape), shapes),
              dict(config=checkpoint.config_json(c), data=dict(step=1)), force=True)
    ckpt.wait()
    ckpt.close()
    return d


def _t2i_config(vq_from=""):
    c = m6_t2i.get_config("tiny")
    c.vq_from = vq_from
    return c


def test_t2i_config_without_tokenizer_checkpoint_is_refused():
    with pytest.raises(InputError, match=r"vq_from=''.*train_vq.py"):
        validate_config(_t2i_config(), 1)


def test_codebook_vocabulary_mismatch_is_refused(vq_dir):
    c = _t2i_config(vq_from=vq_dir)  # t2i.codebook_size 64, the checkpoint has 32
    with pytest.raises(ValueError, match=r"model.vocab_size=2067 .* 32-code codebook.*t2i.codebook_size=32"):
        validate_config(c, 1)
    c.t2i.codebook_size = 32
    validate_config(c, 1)  # fixed by the field the message names


def test_sparse_block_size_not_dividing_the_sequence_is_refused():
    c = tiny_config()
    c.model.update(attention="sparse", sparse_block_size=5)
    with pytest.raises(ValueError, match=r"model.sparse_block_size=5 does not divide the sequence of 28"):
        validate_config(c, 1)
