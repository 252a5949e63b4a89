"""`Embedder`: text, image and image+text embeddings from a pretraining checkpoint.

  from m6jax.embed.api import Embedder
  emb = Embedder.load("/work/runs/cpu_hour")                # + adapter="DIR/adapter"
  vecs = emb.texts(["人民日报", ...])                        # f32 [N, D], unit rows
  vecs = emb.images(patches)                                 # patches [N, P, patch_dim]
  vecs = emb.image_texts(patches, captions)

The model shape, data layout and tokenizer are the checkpoint's (as in fine-tuning),
rows go through the jitted encoder in `batch` chunks sharded over all devices, and an
adapter written by a lora / prompt fine-tune (WORKDIR/adapter) is applied on top.
"""
from __future__ import annotations

import jax
import numpy as np

from m6jax import sharding
from m6jax.data import images as images_lib
from m6jax.data.tokenizer import Tokenizer
from m6jax.embed import encoder, rows
from m6jax.finetune import loop, peft, pretrained
from m6jax.finetune.config import base_config


class Embedder:
    def __init__(self, config, model, mesh, params, adaptation, tokenizer, pooling, batch):
        self.config, self.model, self.mesh = config, model, mesh
        self.params, self.adaptation, self.tok = params, adaptation, tokenizer
        self.pooling, self.batch = pooling, batch
        d = config.data
        self.num_patches = (d.image_size // d.patch_size) ** 2
        self.patch_dim = d.patch_size ** 2 * d.image_channels
        self.length = d.text_len - adaptation.prompt_length
        self._encode = encoder.make_encoder(model, mesh, loop.shardings_of(params), adaptation,
                                            (pooling,))

    @classmethod
    def load(cls, init_from: str, adapter: str = "", pooling: str = "mean", batch: int = 256):
        """The newest checkpoint under `init_from` (+ the adapter directory `adapter`)."""
        ft = base_config("recall")
        ft.init_from = init_from
        source = pretrained.resolve(init_from)
        config = pretrained.run_config(ft, source)
        mesh = sharding.make_mesh(config.mesh)
        base = loop.load_params(config, mesh, source.step_dir)
        adaptation, trainable = peft.Adaptation("full"), base
        if adapter:
            adaptation, trainable = peft.load_adapter(adapter, base)
            trainable = jax.device_put(trainable, jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec()))
        params = (base, trainable) if adaptation.frozen_base else ({}, base)
        return cls(config, loop.build_model(config), mesh, params, adaptation,
                   Tokenizer(source.tokenizer_path), pooling, batch)

    def _run(self, r) -> np.ndarray:
        return encoder.encode_rows(self._encode, self.params, self.mesh, r, self.batch)[self.pooling]

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._run(rows.text_rows(self.tok, texts, self.length, self.num_patches,
                                        self.patch_dim))

    def images(self, patches_npd: np.ndarray) -> np.ndarray:
        return self._run(rows.image_rows(self.tok, patches_npd))

    def image_texts(self, patches_npd: np.ndarray, texts: list[str]) -> np.ndarray:
        return self._run(rows.image_rows(self.tok, patches_npd, texts, self.length))

    def patchify(self, image_hwc: np.ndarray) -> np.ndarray:
        """One image (already at data.image_size) -> its patches [P, patch_dim]."""
        return images_lib.patchify(image_hwc, self.config.data.patch_size)
