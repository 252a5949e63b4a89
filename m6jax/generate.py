"""Caption / text generation: the uncached reference decoder and the KV-cache decoders.

`make_greedy_decoder` recomputes the whole sequence for every new token: simple and
obviously correct, kept as the reference the tests compare against. `make_decoder`
runs the image patches and the prompt once (prefill), keeps every layer's keys and
values in a cache and then feeds one token per step (m6jax/decoding/), for greedy,
sampling (temperature, top-k, top-p) and beam search. Both jit one function over a
batch sharded on the mesh's batch axes, with params in their training shardings.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from m6jax import sharding
from m6jax.decoding import beam, cache as cache_lib, sampling
from m6jax.decoding.sampling import filter_logits  # noqa: F401 (public)

STRATEGIES = ("greedy", "sample", "beam")


def make_greedy_decoder(model, mesh, param_shardings, prompt_len: int, max_new: int,
                        eos_id: int, pad_id: int = 0):
    """Returns `decode(params, patches, image_mask, prompt) -> tokens [B, max_new]`.

    patches f32 [B, P, patch_dim], image_mask bool [B, P], prompt i32 [B, prompt_len]
    (the prefix text, e.g. [<caption>, <en>]). Tokens after an eos are `pad_id`.
    """
    text_len = model.text_len
    if prompt_len + max_new > text_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new ({max_new}) exceeds text_len={text_len}")

    def decode(params, patches, image_mask, prompt):
        b = prompt.shape[0]
        tokens = jnp.zeros((b, text_len), jnp.int32).at[:, :prompt_len].set(prompt)
        positions = jnp.arange(text_len)[None, :]
        is_prefix = jnp.broadcast_to(positions < prompt_len, (b, text_len))

        def body(i, carry):
            tokens, done = carry
            cur = prompt_len + i  # slot to fill
            batch = dict(patches=patches, image_mask=image_mask, text_tokens=tokens,
                         text_mask=jnp.broadcast_to(positions < cur, (b, text_len)),
                         text_is_prefix=is_prefix)
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits = model.apply({"params": params}, batch)           # [B, T, V]
            nxt = jnp.argmax(logits[:, cur - 1], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, pad_id, nxt)
            tokens = tokens.at[:, cur].set(nxt)
            return tokens, done | (nxt == eos_id)

        tokens, _ = jax.lax.fori_loop(0, max_new, body, (tokens, jnp.zeros((b,), bool)))
        return tokens[:, prompt_len:prompt_len + max_new]

    bs = sharding.batch_sharding(mesh)
    return jax.jit(decode, in_shardings=(param_shardings, bs, bs, bs), out_shardings=bs)


def make_decoder(model, mesh, param_shardings, prompt_len: int, max_new: int, eos_id: int,
                 pad_id: int = 0, *, strategy: str = "greedy", temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, beam_size: int = 4,
                 length_penalty: float = 0.6, num_prefix: int | None = None,
                 return_logits: bool = False, num_beams_returned: int = 1):
    """KV-cache decoding. Returns `decode(params, patches, image_mask, prompt, rng=None)`.

    Inputs as for `make_greedy_decoder`; all rows share `prompt_len` (decode prompts of
    other lengths in another call). The first `num_prefix` prompt tokens (default: all)
    are the bidirectional prefix; later ones attend causally, e.g. the text after <lm>
    that a continuation extends. Output: tokens i32 [B, max_new], pad_id after a row's
    eos; the loop stops early once every row has finished. Strategies:
      greedy  argmax; with return_logits also the logits f32 [B, max_new, V] each token
              was chosen from
      sample  softmax(filter_logits(logits, temperature, top_k, top_p)); `rng` (a jax
              PRNG key, default key(0); on several processes a global, replicated one)
              fixes the draws; temperature 0 = greedy
      beam    `beam_size` beams, GNMT length penalty alpha=`length_penalty` (see
              m6jax/decoding/beam.py); the best beam's tokens, or the
              `num_beams_returned` best of each row (rows b * n + rank, [B * n, max_new])
    max_new may reach text_len - prompt_len + 1: the last token is predicted, never fed.
    """
    text_len = model.text_len
    num_prefix = prompt_len if num_prefix is None else num_prefix
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not 1 <= max_new <= text_len - prompt_len + 1:
        raise ValueError(f"max_new={max_new} with a {prompt_len}-token prompt must lie in "
                         f"[1, {text_len - prompt_len + 1}] (data.text_len={text_len}); "
                         "lower max_new or raise data.text_len")
    if strategy == "beam" and not 1 <= num_beams_returned <= beam_size:
        raise ValueError(f"--num_samples={num_beams_returned} with --strategy=beam must lie in "
                         f"[1, --beam_size={beam_size}]: beam search keeps beam_size "
                         "hypotheses; raise --beam_size")
    if not 0 <= num_prefix <= prompt_len:
        raise ValueError(f"num_prefix={num_prefix} must lie in [0, prompt_len={prompt_len}]")
    dmodel = cache_lib.decode_model(model)

    def step_fn(params):
        return lambda cache, tokens: cache_lib.step(dmodel, params, cache, tokens)

    def decode(params, patches, image_mask, prompt, rng):
        if strategy == "beam":
            rep = lambda a: jnp.repeat(a, beam_size, axis=0)  # noqa: E731
            logits, cache = cache_lib.prefill(dmodel, params, rep(patches), rep(image_mask),
                                              rep(prompt), num_prefix)
            tokens, _ = beam.beam_search(step_fn(params), logits, cache, beam_size, max_new,
                                         eos_id, pad_id, length_penalty, num_beams_returned)
            return tokens
        logits, cache = cache_lib.prefill(dmodel, params, patches, image_mask, prompt, num_prefix)
        choose = sampling.chooser(strategy, temperature, top_k, top_p)
        return sampling.decode_loop(step_fn(params), logits, cache, rng, choose, max_new,
                                    eos_id, pad_id, return_logits and strategy != "beam")

    bs = sharding.batch_sharding(mesh)
    out = (bs, bs) if return_logits and strategy != "beam" else bs
    if strategy != "sample":
        # No key argument: greedy and beam take the same inputs as the reference decoder
        # (no host-made key has to be placed on a multi-process mesh).
        jitted = jax.jit(lambda p, x, m, t: decode(p, x, m, t, jax.random.key(0)),
                         in_shardings=(param_shardings, bs, bs, bs), out_shardings=out)
        return lambda params, patches, image_mask, prompt, rng=None: jitted(
            params, patches, image_mask, prompt)
    jitted = jax.jit(decode, in_shardings=(param_shardings, bs, bs, bs, NamedSharding(mesh, P())),
                     out_shardings=out)

    def run(params, patches, image_mask, prompt, rng=None):
        return jitted(params, patches, image_mask, prompt,
                      jax.random.key(0) if rng is None else rng)
    return run


def make_cached_greedy_decoder(model, mesh, param_shardings, prompt_len: int, max_new: int,
                               eos_id: int, pad_id: int = 0):
    """Drop-in for `make_greedy_decoder` with the KV cache: same call, same tokens."""
    decode = make_decoder(model, mesh, param_shardings, prompt_len, max_new, eos_id, pad_id)
    return lambda params, patches, image_mask, prompt: decode(params, patches, image_mask, prompt)


def pad_rows(arrays: list[np.ndarray], multiple: int) -> tuple[list[np.ndarray], int]:
    """Pads the leading dim of each array (repeating the last row) to a multiple."""
    n = arrays[0].shape[0]
    target = -(-n // multiple) * multiple
    if target == n:
        return arrays, n
    return [np.concatenate([a, np.repeat(a[-1:], target - n, axis=0)]) for a in arrays], n
