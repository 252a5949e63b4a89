"""KV-cache decoding (m6jax.generate.make_decoder) against the uncached reference decoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.m6_moe import moe_section
from helpers import GRID, PATCH_DIM, TEXT_LEN, tiny_config
from m6jax import generate, sharding
from m6jax.model.build import build_model
from m6jax.train.state import dummy_batch

PROMPT_LEN, MAX_NEW, B = 2, 8, 8
NO_EOS = -1  # never emitted: every row decodes all MAX_NEW tokens


def _setup(cfg, devices):
    """(model, mesh, params, param_shardings, inputs) for a tiny random-init model."""
    cfg.data.image_size, cfg.data.patch_size = GRID * 2, 2   # GRID x GRID patches of 2x2
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model = build_model(cfg)
    example = dummy_batch(B, GRID * GRID, PATCH_DIM, TEXT_LEN)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
    param_sh = sharding.tree_shardings(mesh, abstract)
    # Random normal params instead of model.init: compiling the init costs ~12 s here,
    # and decoding equality holds for any params (LayerNorms stay at identity).
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a, sh: jax.device_put(
            np.ones(a.shape, a.dtype) if a.ndim == 1 else
            rng.normal(0.0, 0.15, a.shape).astype(a.dtype), sh),
        nn.meta.unbox(abstract), param_sh)
    has_image = np.arange(B) % 2 == 0       # odd rows are text-only continuations
    inputs = dict(
        patches=(rng.random((B, GRID * GRID, PATCH_DIM)) * has_image[:, None, None]).astype(np.float32),
        image_mask=np.repeat(has_image[:, None], GRID * GRID, axis=1),
        prompt=np.stack([np.full(B, 4), rng.integers(8, 10, B)], 1).astype(np.int32))
    inputs = sharding.shard_full_batch(mesh, inputs)
    return model, mesh, params, param_sh, inputs


def _dense_config(**mesh):
    # A 64-token vocabulary (below what the data checks accept; these tests build no
    # data): the random-init model's greedy rows then hold the repeats and new tokens
    # the eos and beam tests pick from.
    c = tiny_config(**mesh)
    c.data.vocab_size = 64
    return c


def _moe_config(**mesh):
    c = _dense_config(**mesh)
    # eval capacity E / k * 2: every expert can take every token, so neither path drops.
    c.model.moe = moe_section(num_experts=4, k=2, every=2, eval_capacity_factor=4.0)
    return c


def _share_config(**mesh):
    c = _dense_config(**mesh)
    c.model.share_layers = True
    return c


CASES = {
    "dense_1dev": (_dense_config, {}, 1),
    "dense_8dev": (_dense_config, dict(data=2, fsdp=2, tensor=2), 8),
    "moe_1dev": (_moe_config, {}, 1),
    "moe_8dev": (_moe_config, dict(data=2, tensor=2, expert=2), 8),
    "shared_layers_1dev": (_share_config, {}, 1),
}
# The default suite keeps one case per property (dense, 1 device; MoE on an expert-
# parallel 8-device mesh; shared layers); the other two run with `-m slow` (~15 s each).
SLOW_CASES = ("dense_8dev", "moe_1dev")


_SETUPS = {}


def _case(name, devices):
    if name not in _SETUPS:
        make_cfg, mesh, n = CASES[name]
        _SETUPS[name] = _setup(make_cfg(**mesh), devices[:n])
    return _SETUPS[name]


@pytest.fixture(scope="module")
def dense(devices):
    return _case("dense_1dev", devices)


def _run(setup, decoder, rng=None):
    model, mesh, params, _, x = setup
    with jax.set_mesh(mesh):
        out = decoder(params, x["patches"], x["image_mask"], x["prompt"], *([] if rng is None else [rng]))
    return jax.tree.map(np.asarray, out)


_DECODERS = {}  # compiled once per module: compiling dominates these tests' time


def _decoder(setup, **kw):
    key = (id(setup), tuple(sorted(kw.items())))
    if key not in _DECODERS:
        model, mesh, _, param_sh, _ = setup
        eos = kw.get("eos_id", NO_EOS)
        _DECODERS[key] = generate.make_decoder(
            model, mesh, param_sh, PROMPT_LEN, MAX_NEW, eos,
            **{k: v for k, v in kw.items() if k != "eos_id"})
    return _DECODERS[key]


def _teacher_forced_logits(setup, tokens):
    """Logits [B, MAX_NEW, V] of one uncached forward over prompt + generated tokens."""
    model, mesh, params, _, x = setup
    text = np.zeros((B, TEXT_LEN), np.int32)
    text[:, :PROMPT_LEN + MAX_NEW - 1] = np.concatenate([np.asarray(x["prompt"]), tokens[:, :-1]], 1)
    pos = np.arange(TEXT_LEN)[None]
    batch = dict(patches=np.asarray(x["patches"]), image_mask=np.asarray(x["image_mask"]),
                 text_tokens=text, text_mask=np.broadcast_to(pos < PROMPT_LEN + MAX_NEW - 1, text.shape),
                 text_is_prefix=np.broadcast_to(pos < PROMPT_LEN, text.shape))
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES), jax.set_mesh(mesh):
        logits = jax.jit(model.apply)({"params": params}, batch)
    return np.asarray(logits)[:, PROMPT_LEN - 1:PROMPT_LEN - 1 + MAX_NEW]


def test_cached_greedy_equals_the_uncached_reference_decoder(dense):
    model, mesh, _, param_sh, _ = dense
    ref = generate.make_greedy_decoder(model, mesh, param_sh, PROMPT_LEN, MAX_NEW, NO_EOS)
    np.testing.assert_array_equal(_run(dense, _decoder(dense)), _run(dense, ref))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in CASES])
def test_cached_logits_match_an_uncached_forward(case, devices):
    """Each step's logits equal one full forward over prompt + tokens so far, and each
    token is their argmax: exactly what the uncached greedy decoder computes."""
    setup = _case(case, devices)
    tokens, logits = _run(setup, _decoder(setup, return_logits=True))
    ref = _teacher_forced_logits(setup, tokens)
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(tokens, ref.argmax(-1))


def test_beam_of_width_one_is_greedy(dense):
    greedy = _run(dense, _decoder(dense))
    beam = _run(dense, _decoder(dense, strategy="beam", beam_size=1))
    np.testing.assert_array_equal(beam, greedy)


def test_beam_returns_its_n_best_distinct_beams(dense):
    """--strategy=beam --num_samples=3 prints 3 different hypotheses per input (it printed
    the best one 3 times), the first being what beam search alone returns."""
    best = _run(dense, _decoder(dense, strategy="beam", beam_size=3))
    top3 = _run(dense, _decoder(dense, strategy="beam", beam_size=3, num_beams_returned=3))
    assert top3.shape == (3 * B, MAX_NEW)
    np.testing.assert_array_equal(top3[::3], best)
    for row in range(B):
        assert len({tuple(t) for t in top3[3 * row:3 * row + 3]}) == 3, row


@pytest.mark.slow
def test_beam_search_scores_at_least_greedy(dense):
    """The best of 3 beams (no length penalty) is at least as likely as the greedy path."""
    greedy = _run(dense, _decoder(dense))
    beam = _run(dense, _decoder(dense, strategy="beam", beam_size=3, length_penalty=0.0))
    logp = lambda t: np.take_along_axis(  # noqa: E731
        jax.nn.log_softmax(_teacher_forced_logits(dense, t)), t[..., None], -1).sum((1, 2))
    assert np.all(logp(beam) >= logp(greedy) - 1e-4)


def test_sampling_with_a_fixed_key_is_reproducible(dense):
    decode = _decoder(dense, strategy="sample", temperature=1.5, top_k=20, top_p=0.9)
    a = _run(dense, decode, jax.random.key(7))
    np.testing.assert_array_equal(a, _run(dense, decode, jax.random.key(7)))
    assert not np.array_equal(a, _run(dense, decode, jax.random.key(8)))


def test_top_k_one_sampling_is_greedy(dense):
    sampled = _run(dense, _decoder(dense, strategy="sample", temperature=2.0, top_k=1),
                   jax.random.key(3))
    np.testing.assert_array_equal(sampled, _run(dense, _decoder(dense)))


def test_eos_stops_a_row_and_pads_after_it(dense):
    greedy = _run(dense, _decoder(dense))
    # The first token some row r emits at j >= 1 and not before becomes the eos.
    r, j = next((r, i) for r in range(B) for i in range(1, MAX_NEW - 1)
                if greedy[r, i] not in greedy[r, :i])
    eos = int(greedy[r, j])
    tokens = _run(dense, _decoder(dense, eos_id=eos, pad_id=0))
    np.testing.assert_array_equal(tokens[r, :j + 1], greedy[r, :j + 1])
    assert np.all(tokens[r, j + 1:] == 0)
    for row, ref in zip(tokens, greedy):      # every row: greedy up to its eos, then pad
        stop = np.flatnonzero(ref == eos)
        n = stop[0] + 1 if stop.size else MAX_NEW
        np.testing.assert_array_equal(row[:n], ref[:n])
        assert np.all(row[n:] == 0), row


def test_filter_logits_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(generate.filter_logits(logits, top_p=0.75))) & (
        np.asarray(generate.filter_logits(logits, top_p=0.75)) > -1e30)
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    top2 = np.asarray(generate.filter_logits(logits, top_k=2)) > -1e30
    np.testing.assert_array_equal(top2, [[True, True, False, False]])
