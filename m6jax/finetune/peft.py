"""What a fine-tune trains: the whole model, a LoRA adapter, or a learned prompt.

  full    every parameter (the pretraining train step's path, `loop.finetune`)
  lora    W + (alpha / rank) * A @ B on the attention (query, key, value, out) and MLP
          (wi, wo) kernels of every layer and the token table (Hu et al. 2021): A [L, in, r] ~ N(0, 1/in),
          B [L, r, out] = 0, so step 0 is the pretrained model; the base stays frozen
  prompt  `prompt_length` learned vectors that replace the token embeddings of as many
          slots put in front of the text (Lester et al. 2021); the base stays frozen

The adapter is applied by merging in the forward pass: the layers' kernels are stacked
[L, ...] and run in a layer scan, so W + dW is formed once per step per kernel (a few
matmuls of rank r) and the model code is unchanged. Gradients reach only the adapter
(the base is an input of the step, not differentiated), the optimizer state is only
the adapter's, and `merge` writes the same sum into the base weights for serving.
No maintained LoRA library fits here: qwix is quantization, not installed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m6jax.model.layers import layer_norm

METHODS = ("full", "lora", "prompt")
# kernel name -> (path under params["stack"]["layers"], input axes after the layer axis)
LORA_KERNELS = {"query": (("attn", "query"), 1), "key": (("attn", "key"), 1),
                "value": (("attn", "value"), 1), "out": (("attn", "out"), 2),
                "wi": (("mlp", "wi", "kernel"), 1), "wo": (("mlp", "wo", "kernel"), 1),
                # The token table [V, D] (tied: also the output layer), at the top of
                # the params; its A, B get a leading axis of 1.
                "token_emb": (("token_emb", "embedding"), 1)}
_TOP_LEVEL = ("token_emb",)


@dataclass(frozen=True)
class Adaptation:
    method: str = "full"
    rank: int = 4
    alpha: float = 8.0
    targets: tuple = tuple(LORA_KERNELS)
    prompt_length: int = 0  # prompt: learned slots; the rows must leave that much room

    @classmethod
    def from_config(cls, ft) -> "Adaptation":
        """From a fine-tune config's `method`, `lora.*` and `prompt.*` (one-line errors)."""
        if ft.method not in METHODS:
            raise ValueError(f"method={ft.method!r} is not one of {', '.join(METHODS)}")
        targets = tuple(t.strip() for t in ft.lora.targets.split(",") if t.strip())
        bad = [t for t in targets if t not in LORA_KERNELS]
        if bad or not targets:
            raise ValueError(f"lora.targets={ft.lora.targets!r}: name some of "
                             f"{', '.join(LORA_KERNELS)}")
        if int(ft.lora.rank) <= 0:
            raise ValueError(f"lora.rank={ft.lora.rank} must be positive")
        if ft.method == "prompt" and int(ft.prompt.length) <= 0:
            raise ValueError(f"prompt.length={ft.prompt.length} must be positive")
        return cls(ft.method, int(ft.lora.rank), float(ft.lora.alpha), targets,
                   int(ft.prompt.length) if ft.method == "prompt" else 0)

    @property
    def frozen_base(self) -> bool:
        return self.method != "full"

    # ---- the trainable tree ------------------------------------------------------------
    def init(self, base, rng):
        """The trainable parameters at step 0 (full: the base itself)."""
        if self.method == "full":
            return base
        if self.method == "prompt":
            emb = base["token_emb"]["embedding"]                                   # [V, D]
            # Init from the embeddings of random vocabulary tokens (Lester et al.'s best).
            ids = jax.random.randint(rng, (self.prompt_length,), 10, emb.shape[0])
            return {"prompt": jnp.asarray(emb)[ids].astype(jnp.float32)}
        out = {}
        for i, name in enumerate(self.targets):
            w = _at(base if name in _TOP_LEVEL else base["stack"]["layers"], LORA_KERNELS[name][0])
            shape = (1, *w.shape) if name in _TOP_LEVEL else w.shape
            n_in = LORA_KERNELS[name][1]
            lead, fan_in, fan_out = shape[0], int(np.prod(shape[1:1 + n_in])), int(
                np.prod(shape[1 + n_in:]))
            a = jax.random.normal(jax.random.fold_in(rng, i), (lead, fan_in, self.rank),
                                  jnp.float32) / np.sqrt(fan_in)
            out[name] = {"a": a, "b": jnp.zeros((lead, self.rank, fan_out), jnp.float32)}
        return out

    def params(self, base, trainable):
        """The model's parameters: full -> trainable; lora -> base with W + s * A @ B;
        prompt -> base (the prompt enters through the token embeddings, `apply`)."""
        if self.method == "full":
            return trainable
        if self.method == "prompt":
            return base
        scale = self.alpha / self.rank
        layers, top = dict(base["stack"]["layers"]), dict(base)
        for name, ab in trainable.items():
            path, _ = LORA_KERNELS[name]
            tree = top if name in _TOP_LEVEL else layers
            w = _at(tree, path)
            delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]).reshape(w.shape)
            tree = _set(tree, path, (w.astype(jnp.float32) + scale * delta).astype(w.dtype))
            layers, top = (layers, tree) if name in _TOP_LEVEL else (tree, top)
        return {**top, "stack": {**base["stack"], "layers": layers}}

    merge = params  # lora: the merged weights a server loads as an ordinary checkpoint

    # ---- the forward pass --------------------------------------------------------------
    def apply(self, model, base, trainable, batch, **kw):
        """model.apply with the adaptation -> (logits f32 [B, T, V], hidden [B, P + T, D]).

        hidden is the final-normed last layer over image patches and text (for pooling);
        with a prompt both leave out the prompt slots, so they line up with `batch`.
        """
        n = self.prompt_length
        if n:
            batch = with_prompt_slots(batch, n)
        params = self.params(base, trainable)
        capture = lambda mdl, _: mdl.name == "stack"  # noqa: E731
        with nn.intercept_methods(_prompt_interceptor(trainable["prompt"], n) if n else
                                  _no_interceptor):
            logits, inter = model.apply({"params": params}, batch, capture_intermediates=capture,
                                        mutable=["intermediates"], **kw)
        x = inter["intermediates"]["stack"]["__call__"][0][0]                      # [B, S, D]
        hidden = layer_norm(jnp.dtype(model.cfg.dtype)).apply(
            {"params": params["final_norm"]}, x)
        if n:
            p = x.shape[1] - batch["text_tokens"].shape[1]
            hidden = jnp.concatenate([hidden[:, :p], hidden[:, p + n:]], axis=1)
            logits = logits[:, n:]
        return logits, hidden, inter


def with_prompt_slots(batch, n: int):
    """`n` text slots in front of the text: valid, bidirectional, not in the loss."""
    b = batch["text_tokens"].shape[0]
    fill = {"text_tokens": 0, "text_mask": True, "text_is_prefix": True, "targets": 0,
            "loss_mask": False}
    out = dict(batch)
    for k, v in fill.items():
        if k in batch:
            pad = jnp.full((b, n), v, batch[k].dtype)
            out[k] = jnp.concatenate([pad, batch[k]], axis=1)
    return out


def _prompt_interceptor(prompt_nd, n: int):
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "token_emb" and context.method_name == "__call__":
            out = out.at[:, :n].set(prompt_nd.astype(out.dtype))
        return out
    return intercept


def _no_interceptor(next_fun, args, kwargs, context):
    return next_fun(*args, **kwargs)


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


# ---- adapter-only checkpoints ------------------------------------------------------------

def save_adapter(directory: str, adaptation: Adaptation, trainable, base_step_dir: str) -> int:
    """Writes the adapter (orbax) and adapter.json (method, rank, alpha, targets, base);
    returns the bytes on disk."""
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "params"), trainable, force=True)
    ckpt.wait_until_finished()
    meta = dict(method=adaptation.method, rank=adaptation.rank, alpha=adaptation.alpha,
                targets=list(adaptation.targets), prompt_length=adaptation.prompt_length,
                base=base_step_dir)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "adapter.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    return sum(os.path.getsize(os.path.join(r, f))
               for r, _, fs in os.walk(os.path.join(directory, "params")) for f in fs)


def load_adapter(directory: str, base):
    """(Adaptation, trainable) from `save_adapter`'s directory, shaped against `base`."""
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, "adapter.json"), encoding="utf-8") as f:
        meta = json.load(f)
    adaptation = Adaptation(meta["method"], meta["rank"], meta["alpha"], tuple(meta["targets"]),
                            meta["prompt_length"])
    abstract = jax.eval_shape(lambda: adaptation.init(base, jax.random.key(0)))
    trainable = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), abstract)
    return adaptation, trainable


def summary(adaptation: Adaptation, base, trainable, workdir: str, base_step_dir: str) -> dict:
    """lora / prompt: saves the adapter under WORKDIR/adapter and returns its sizes next to
    the base's (`adapter_bytes`, `base_bytes`: the arrays; `adapter_disk_bytes`: the
    checkpoint's files); full: {}."""
    if not adaptation.frozen_base:
        return {}
    disk = save_adapter(os.path.join(workdir, "adapter"), adaptation, trainable, base_step_dir)
    adapter, whole = tree_bytes(trainable), tree_bytes(base)
    return dict(adapter_bytes=adapter, base_bytes=whole, adapter_fraction=adapter / whole,
                adapter_disk_bytes=disk, adapter_dir=os.path.join(workdir, "adapter"))
