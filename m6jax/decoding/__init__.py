"""KV-cache decoding: prefill/step around M6(decode=True), sampling and beam search.

The public entry point is `m6jax.generate`; these modules hold its pieces.
"""
