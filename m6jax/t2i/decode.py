"""Text -> image codes: autoregressive with the KV cache, or MaskGIT-style in parallel.

Both take prompts i32 [B, Lp] (m6jax/t2i/data.py `Prompts`: fixed length, so code i
sits at the same text position as in training) and return codes i32 [B, N] in [0, K).
Logits are restricted to the K code ids. Classifier-free guidance (guidance_scale s
!= 1) runs the unconditional prompt in the same batch and uses
uncond + s * (cond - uncond) (Ho & Salimans 2021); the chosen code is fed to both rows.

  ar    prefill the prompt once, then N one-token steps (m6jax/decoding/cache.py);
        greedy (temperature 0) or sampling with temperature / top-k / top-p; code i is
        drawn with key fold_in(key, i)
  mask  MaskGIT (Chang et al. 2022): all N slots start as <code_mask>; each of `steps`
        full bidirectional passes samples every masked slot, keeps the most confident
        and re-masks the rest, N * cos(pi/2 * t / steps) of them after step t (so the
        last step fills all); confidence = log p of the sampled code + Gumbel noise of
        scale choice_temperature * (1 - t / steps)
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax import sharding
from m6jax.decoding import cache as cache_lib
from m6jax.decoding.sampling import filter_logits
from m6jax.t2i.vocab import CodeVocab


def _guided(code_logits, b: int, scale: float):
    """[2B, K] (cond rows then uncond rows) -> [B, K]; [B, K] unchanged without guidance."""
    if scale == 1.0:
        return code_logits
    cond, uncond = code_logits[:b], code_logits[b:]
    return uncond + scale * (cond - uncond)


def _choose(logits, key, temperature: float, top_k: int, top_p: float):
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def _with_uncond(prompt, uncond, scale):
    if scale == 1.0:
        return prompt
    return jnp.concatenate([prompt, jnp.broadcast_to(uncond, prompt.shape)], 0)


def make_ar_decoder(model, vocab: CodeVocab, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, guidance_scale: float = 1.0, uncond_prompt=None,
                    return_logits: bool = False):
    """`decode(params, prompt [B, Lp], key) -> codes [B, N]` with the KV cache (jitted).
    `uncond_prompt` [Lp] is needed when guidance_scale != 1. With return_logits also the
    (guided) code logits f32 [B, N, K] each code was drawn from."""
    dmodel = cache_lib.decode_model(model)
    n, lo, hi = vocab.num_codes, vocab.offset, vocab.offset + vocab.codebook_size
    num_patches = model.image_grid ** 2

    def decode(params, prompt, key):
        b = prompt.shape[0]
        rows = _with_uncond(prompt, uncond_prompt, guidance_scale)
        r = rows.shape[0]
        patches = jnp.zeros((r, num_patches, _patch_dim(params)), jnp.float32)
        logits, cache = cache_lib.prefill(dmodel, params, patches, jnp.zeros((r, num_patches), bool),
                                          rows, rows.shape[1])

        def body(i, carry):
            codes, seen, cache, logits = carry
            guided = _guided(logits[:, lo:hi], b, guidance_scale)
            code = _choose(guided, jax.random.fold_in(key, i), temperature, top_k, top_p)
            codes = codes.at[:, i].set(code)
            if return_logits:
                seen = seen.at[:, i].set(guided)
            feed = jnp.tile(code + lo, r // b)
            logits, cache = cache_lib.step(dmodel, params, cache, feed)
            return codes, seen, cache, logits

        codes = jnp.zeros((b, n), jnp.int32)
        seen = jnp.zeros((b, n if return_logits else 0, hi - lo), jnp.float32)
        # The last step's logits (code N + 1, i.e. eos) are computed and unused: one
        # extra step keeps the loop uniform.
        codes, seen, _, _ = jax.lax.fori_loop(0, n, body, (codes, seen, cache, logits))
        return (codes, seen) if return_logits else codes

    return jax.jit(decode)


def _patch_dim(params) -> int:
    """The image-patch width the model was built for (text-only calls feed zeros)."""
    return jax.tree.leaves(params["patch_proj"]["kernel"])[0].shape[0]


def make_uncached_ar_decoder(model, vocab: CodeVocab, *, temperature: float = 1.0,
                             top_k: int = 0, top_p: float = 1.0, guidance_scale: float = 1.0,
                             uncond_prompt=None, return_logits: bool = False):
    """The reference for `make_ar_decoder`: the whole sequence recomputed for every code
    (prefix bidirectional, codes causal, as in training); same call, same draws."""
    n, lo, hi = vocab.num_codes, vocab.offset, vocab.offset + vocab.codebook_size
    num_patches, text_len = model.image_grid ** 2, model.text_len

    def decode(params, prompt, key):
        b = prompt.shape[0]
        rows = _with_uncond(prompt, uncond_prompt, guidance_scale)
        r, lp = rows.shape
        tokens = jnp.zeros((r, text_len), jnp.int32).at[:, :lp].set(rows)
        pos = jnp.arange(text_len)[None]

        def body(i, carry):
            codes, seen, tokens = carry
            batch = dict(patches=jnp.zeros((r, num_patches, _patch_dim(params)), jnp.float32),
                         image_mask=jnp.zeros((r, num_patches), bool), text_tokens=tokens,
                         text_mask=jnp.broadcast_to(pos < lp + i, (r, text_len)),
                         text_is_prefix=jnp.broadcast_to(pos < lp, (r, text_len)))
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits = model.apply({"params": params}, batch)
            last = jax.lax.dynamic_index_in_dim(logits, lp + i - 1, 1, keepdims=False)
            guided = _guided(last[:, lo:hi], b, guidance_scale)
            code = _choose(guided, jax.random.fold_in(key, i), temperature, top_k, top_p)
            tokens = jax.lax.dynamic_update_slice_in_dim(
                tokens, jnp.tile(code + lo, r // b)[:, None], lp + i, axis=1)
            if return_logits:
                seen = seen.at[:, i].set(guided)
            return codes.at[:, i].set(code), seen, tokens

        seen = jnp.zeros((b, n if return_logits else 0, hi - lo), jnp.float32)
        codes, seen, _ = jax.lax.fori_loop(0, n, body, (jnp.zeros((b, n), jnp.int32), seen, tokens))
        return (codes, seen) if return_logits else codes

    return jax.jit(decode)


def mask_schedule(steps: int, n: int) -> list[int]:
    """Slots still masked after each of `steps` steps: floor(n * cos(pi/2 * t/steps)),
    at most one fewer than before (every step fills at least one), 0 after the last."""
    out, prev = [], n
    for t in range(1, steps + 1):
        m = min(int(math.floor(n * math.cos(math.pi / 2 * t / steps))), prev - 1)
        m = max(m, 0)
        out.append(m)
        prev = m
    out[-1] = 0
    return out


def make_mask_decoder(model, vocab: CodeVocab, *, steps: int = 8, temperature: float = 1.0,
                      top_k: int = 0, choice_temperature: float = 4.5,
                      guidance_scale: float = 1.0, uncond_prompt=None):
    """`decode(params, prompt [B, Lp], key) -> codes [B, N]`: MaskGIT parallel decoding
    in `steps` full passes (prompts built with masked=True, the <image_mask> symbol)."""
    n, lo, hi = vocab.num_codes, vocab.offset, vocab.offset + vocab.codebook_size
    k = vocab.codebook_size
    num_patches, text_len = model.image_grid ** 2, model.text_len
    if not 1 <= steps <= n:
        raise ValueError(f"mask steps={steps} must lie in [1, {n}] (codes per image)")
    schedule = mask_schedule(steps, n)

    def decode(params, prompt, key):
        b = prompt.shape[0]
        rows = _with_uncond(prompt, uncond_prompt, guidance_scale)
        r, lp = rows.shape
        pos = jnp.arange(text_len)[None]
        visible = jnp.broadcast_to(pos < lp + n, (r, text_len))
        codes = jnp.full((b, n), k, jnp.int32)  # k = still masked
        for t in range(steps):
            ids = jnp.where(codes == k, vocab.code_mask_id, codes + lo)
            tokens = jnp.zeros((r, text_len), jnp.int32).at[:, :lp].set(rows)
            tokens = tokens.at[:, lp:lp + n].set(jnp.tile(ids, (r // b, 1)))
            batch = dict(patches=jnp.zeros((r, num_patches, _patch_dim(params)), jnp.float32),
                         image_mask=jnp.zeros((r, num_patches), bool), text_tokens=tokens,
                         text_mask=visible, text_is_prefix=visible)
            with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                logits = model.apply({"params": params}, batch)[:, lp:lp + n, lo:hi]  # [R, N, K]
            logits = _guided(logits, b, guidance_scale)
            k_sample, k_noise = jax.random.split(jax.random.fold_in(key, t))
            filtered = filter_logits(logits, max(temperature, 1e-6), top_k) if temperature else logits
            sampled = (jax.random.categorical(k_sample, filtered) if temperature
                       else jnp.argmax(logits, -1)).astype(jnp.int32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(filtered), sampled[..., None], -1)[..., 0]
            unknown = codes == k
            sampled = jnp.where(unknown, sampled, codes)
            noise = choice_temperature * (1.0 - (t + 1) / steps) * jax.random.gumbel(k_noise, (b, n))
            confidence = jnp.where(unknown, logp + noise, jnp.inf)
            remask = schedule[t]
            if remask:
                cutoff = jnp.sort(confidence, axis=-1)[:, remask - 1:remask]      # [B, 1]
                codes = jnp.where(confidence <= cutoff, k, sampled)
            else:
                codes = sampled
        return codes

    return jax.jit(decode)
