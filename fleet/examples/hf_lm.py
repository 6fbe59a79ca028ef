"""hf_lm: a Hugging Face ``transformers`` causal language model (the GPT-2 architecture,
built from a config: nothing is downloaded from the hub) trained on the charlm corpus's
bytes, through :class:`~fleet.workloads.TorchWorkload`. Optional extra:
``pip install 'fleet-diloco[hf]'``.

Tokens are bytes (vocabulary 256), so no tokenizer is needed; the data is the charlm
dataset (``fleet dataset write charlm PATH``: safetensors ``{"tokens": uint8 [n]}``
microshards), cut into non-overlapping windows of ``context`` bytes. Without a dataset,
replica ``i`` of ``N`` trains on the ``i``-th of ``N`` slices of the corpus.

Config (all optional): ``d_model`` (128), ``n_layers`` (2), ``n_heads`` (4), ``context``
(128), ``batch_size`` (16), ``lr`` (2e-3, AdamW), ``seed`` (0), ``eval_windows`` (64),
``max_corpus_mb`` (None: all). Metrics: ``loss`` (nats per byte), ``bits_per_byte``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from fleet.examples.charlm import VOCAB, load_corpus
from fleet.workloads import ShardPaths, TorchWorkload


def windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """int64 ``[n, context]``: the non-overlapping windows of a uint8 token stream."""
    n = len(tokens) // context
    return tokens[: n * context].view(n, context).long()


def make(config: dict[str, Any]) -> TorchWorkload:
    """The workload factory (``fleet.examples.hf_lm:make``).

    Raises:
        ImportError: ``transformers`` is not installed (the ``hf`` extra).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    context, batch_size = int(config.get("context", 128)), int(config.get("batch_size", 16))
    max_mb = config.get("max_corpus_mb")
    corpus = load_corpus(None if max_mb is None else int(float(max_mb) * 1e6))
    model_config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=context,
        n_embd=int(config.get("d_model", 128)),
        n_layer=int(config.get("n_layers", 2)),
        n_head=int(config.get("n_heads", 4)),
        bos_token_id=0,
        eos_token_id=0,
    )

    def train_data(shards: ShardPaths) -> DataLoader[Any]:
        if shards:
            tokens = torch.cat([load_file(p)["tokens"] for p in shards])
        else:
            train = corpus["Train"]
            size = len(train) // shards.num_replicas
            tokens = train[shards.replica * size : (shards.replica + 1) * size]
        return DataLoader(TensorDataset(windows(tokens, context)), batch_size, shuffle=True)

    def eval_data(split: str) -> DataLoader[Any]:
        data = windows(corpus.get(split, corpus["Validation"]), context)
        picked = torch.linspace(0, len(data) - 1, int(config.get("eval_windows", 64))).long()
        return DataLoader(TensorDataset(data[picked]), batch_size=64)

    def loss(model: Any, batch: list[torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = model(input_ids=batch[0], labels=batch[0]).loss  # labels shifted
        return out

    return TorchWorkload(
        model=lambda: GPT2LMHeadModel(model_config),
        optimizer=lambda params: torch.optim.AdamW(params, lr=float(config.get("lr", 2e-3))),
        loss=loss,
        train_data=train_data,
        eval_data=eval_data,
        metrics=lambda model, batch: {"bits_per_byte": float(loss(model, batch)) / math.log(2)},
        clip_grad_norm=1.0,
        config=config,
        name="hf-gpt2-bytes",
    )
