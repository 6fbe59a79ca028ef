"""charlm: a byte-level decoder-only transformer language model, trained on the Python
standard library's own ``.py`` sources (a real corpus of tens of MB on every machine
with Python; nothing is downloaded).

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (not
site-packages), in sorted relative-path order. A file goes to the validation split if
``sha256(relative path)`` mod 50 is 0, to the test split if it is 1, otherwise to
train, so the split is deterministic and independent of the file count. Bytes are
tokens (vocabulary 256). Under DiLoCo (batch ``payload.replica`` / ``num_replicas``),
replica ``i`` samples only from the ``i``-th of ``num_replicas`` contiguous slices of
the training stream: disjoint shards.

Shapes: ``B`` batch size, ``T`` context length, ``D`` model width, ``V = 256``.

Dataset mode: :func:`write_dataset` (``fleet dataset write charlm PATH``) writes the
training split as microshards (safetensors ``{"tokens": uint8 [n]}``, contiguous
slices); a BatchRef that carries ``shard_paths`` (``cached_microshard_group``, or
``payload.shard_paths`` of a ``micro_epoch``) is trained on windows sampled from those
shards only. The sampling seed comes from the BatchRef (its lease, round and step when
it has them) and how many times this process used it, so a re-run of a round's lease
samples the same windows.

Config (all optional): ``d_model`` (128), ``n_layers`` (2), ``n_heads`` (4),
``context`` (128), ``batch_size`` (16), ``lr`` (2e-3, AdamW), ``weight_decay`` (0.01),
``seed`` (0), ``eval_windows`` (64), ``max_corpus_mb`` (None: all), ``threads`` (None),
``warmup_steps`` (0: none; else the learning rate ramps linearly to ``lr`` over the
first this many inner optimizer steps, counted by the optimizer's own step count, which
a DiLoCo replica's inner optimizer state carries across rounds: the global step),
``eval_timing`` (False; True: evaluation metrics carry ``eval_s``, the seconds the
evaluation itself took, no model load).
Metrics: ``loss`` (nats per byte), ``bits_per_byte``, ``examples``, ``tokens``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sysconfig
import time
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from fleet.data.batches import batch_key, shard_paths_of
from fleet.data.dataset import write_dataset as write_microshards
from fleet.workloads.merge_hooks import MergeHooks

VOCAB = 256


def corpus_files(root: Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files (no site-packages), sorted by relative path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in base.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def split_of(relative_path: str) -> str:
    """``"Validation"``, ``"Test"`` or ``"Train"`` for a corpus file, by its path hash."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 50
    return {0: "Validation", 1: "Test"}.get(bucket, "Train")


@cache
def load_corpus(max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The corpus as uint8 ``[n_bytes]`` per split (files joined with a blank line),
    deterministic; the train split is cut at ``max_bytes`` if given."""
    base = Path(sysconfig.get_paths()["stdlib"])
    chunks: dict[str, list[bytes]] = {"Train": [], "Validation": [], "Test": []}
    sizes = dict.fromkeys(chunks, 0)
    for path in corpus_files(base):
        split = split_of(path.relative_to(base).as_posix())
        if split == "Train" and max_bytes is not None and sizes["Train"] >= max_bytes:
            continue
        data = path.read_bytes() + b"\n\n"
        chunks[split].append(data)
        sizes[split] += len(data)
    out = {}
    for split, parts in chunks.items():
        blob = b"".join(parts)
        if split == "Train" and max_bytes is not None:
            blob = blob[:max_bytes]
        out[split] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def write_dataset(out_dir: Path, microshards: int = 64, *, manifest: bool = True) -> dict[str, int]:
    """Write the training split as ``microshards`` contiguous microshards in ``out_dir``
    (safetensors ``{"tokens": uint8 [n]}``; with burn_p2p's ``fetch-manifest.json`` when
    ``manifest``). Returns ``{"microshards", "bytes"}``."""
    tokens = load_corpus()["Train"]
    bounds = torch.linspace(0, len(tokens), microshards + 1).long().tolist()
    shards = [save({"tokens": tokens[a:b].clone()}) for a, b in itertools.pairwise(bounds)]
    index = write_microshards(
        Path(out_dir), shards, manifest=manifest, view_id=f"charlm-stdlib-{microshards}"
    )
    return {"microshards": len(index.microshards), "bytes": index.total_bytes}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP. ``x``: ``[B, T, D]``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class CharLM(nn.Module):
    """Byte-level GPT: tokens ``[B, T]`` (int64 in [0, 256)) -> logits ``[B, T, 256]``."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


class CharLMWorkload(MergeHooks):
    workload_name = "charlm"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.d_model = int(config.get("d_model", 128))
        self.n_layers = int(config.get("n_layers", 2))
        self.n_heads = int(config.get("n_heads", 4))
        self.context = int(config.get("context", 128))
        self.batch_size = int(config.get("batch_size", 16))
        self.lr = float(config.get("lr", 2e-3))
        self.weight_decay = float(config.get("weight_decay", 0.01))
        self.seed = int(config.get("seed", 0))
        self.eval_windows = int(config.get("eval_windows", 64))
        self.warmup_steps = int(config.get("warmup_steps", 0))
        self.eval_timing = bool(config.get("eval_timing", False))
        max_mb = config.get("max_corpus_mb")
        self.corpus = load_corpus(None if max_mb is None else int(float(max_mb) * 1e6))
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        self.cursor = 0
        self._shards: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uses: OrderedDict[str, int] = OrderedDict()

    # ------------------------------------------------------------------ protocol hooks

    def runtime_device(self) -> str:
        return "python-torch-cuda" if torch.cuda.is_available() else "python-torch-cpu"

    def capability_probe(self) -> dict[str, Any]:
        """Measures training tokens per second over a few real steps on the best device."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = self.init_model(device)
        self.train_window(state, [])
        start = time.perf_counter()
        for _ in range(3):
            self.train_window(state, [])
        tokens_per_s = 3 * self.batch_size * self.context / (time.perf_counter() - start)
        return {
            "preferred_backends": ["cuda", "cpu"] if device == "cuda" else ["cpu"],
            "work_units_per_second": tokens_per_s,
            "target_window_seconds": 30,
        }

    def init_model(self, device: str) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        model = CharLM(self.d_model, self.n_layers, self.n_heads, self.context).to(device)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        return {"model": model, "optimizer": optimizer}

    def _windows(
        self, data: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.context + 1)[None, :]
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def _shard_tokens(self, paths: list[str]) -> torch.Tensor:
        """The tokens of these shard files, concatenated (files cached, the newest 256)."""
        parts = []
        for path in paths:
            if path not in self._shards:
                self._shards[path] = load_file(path)["tokens"]
                while len(self._shards) > 256:
                    self._shards.popitem(last=False)
            parts.append(self._shards[path])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _shard_batch(
        self, batch: dict[str, Any], paths: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._shard_tokens(paths)
        key = batch_key(batch)
        uses = self._uses.pop(key, 0)
        self._uses[key] = uses + 1
        while len(self._uses) > 100_000:
            self._uses.popitem(last=False)
        digest = hashlib.sha256(json.dumps([self.seed, key, uses]).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**62)
        high = max(1, len(data) - self.context - 1)
        starts = torch.randint(0, high, (self.batch_size,), generator=gen)
        return self._windows(data, starts)

    def _train_batch(self, batch: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        paths = shard_paths_of(batch)
        if batch is not None and paths:
            return self._shard_batch(batch, paths)
        data = self.corpus["Train"]
        payload = (batch or {}).get("payload")
        replica, num_replicas = 0, 1
        if isinstance(payload, dict) and "num_replicas" in payload:
            replica, num_replicas = int(payload["replica"]), int(payload["num_replicas"])
        shard = len(data) // num_replicas
        data = data[replica * shard : (replica + 1) * shard]
        if batch and batch.get("ordinals"):
            step = int(batch["ordinals"][0])
        else:
            step = self.cursor
            self.cursor += 1
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + replica) * 1_000_003 + step) % 2**62
        )
        starts = torch.randint(0, len(data) - self.context - 1, (self.batch_size,), generator=gen)
        return self._windows(data, starts)

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One AdamW step per batch ref (one on its own data if ``batches`` is empty)."""
        model, optimizer = state["model"], state["optimizer"]
        device = next(model.parameters()).device
        model.train()
        losses = []
        steps: list[dict[str, Any] | None] = list(batches) or [None]
        for batch in steps:
            x, y = self._train_batch(batch)
            logits = model(x.to(device))
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.to(device).reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if self.warmup_steps > 0:
                self._warm_lr(optimizer)
            optimizer.step()
            losses.append(loss.item())
        mean = sum(losses) / len(losses)
        n = len(losses) * self.batch_size
        return {
            "loss": mean,
            "bits_per_byte": mean / math.log(2),
            "examples": n,
            "tokens": n * self.context,
        }

    def _warm_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Set the learning rate of the step about to be taken: ``lr * (n + 1) /
        warmup_steps`` for the optimizer's ``n``-th step (its own step count, so no
        scheduler state), ``lr`` from step ``warmup_steps - 1`` on."""
        done = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if step is not None:
                    done = int(step)
                    break
            break
        lr = self.lr * min(1.0, (done + 1) / self.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        """Mean next-byte cross-entropy (nats) on ``eval_windows`` fixed windows spread
        evenly over the split, and its standard error over the windows
        (``loss_stderr``: the sample standard deviation of the per-window losses over
        the square root of their number)."""
        name = split if isinstance(split, str) else "Validation"
        data = self.corpus[name if name in self.corpus else "Validation"]
        starts = torch.linspace(0, len(data) - self.context - 2, self.eval_windows).long()
        model = state["model"]
        device = next(model.parameters()).device
        started = time.perf_counter()
        model.eval()
        per_window = []
        with torch.no_grad():
            for part in starts.split(16):
                x, y = self._windows(data, part)
                logits = model(x.to(device))
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, VOCAB), y.to(device).reshape(-1), reduction="none"
                )
                per_window.append(loss.reshape(len(part), -1).mean(dim=1).double().cpu())
        losses = torch.cat(per_window)
        mean = float(losses.mean())
        stderr = float(losses.std() / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
        metrics: dict[str, Any] = {
            "loss": mean,
            "loss_stderr": stderr,
            "bits_per_byte": mean / math.log(2),
            "examples": len(starts),
        }
        if self.eval_timing:
            metrics["eval_s"] = time.perf_counter() - started
        return metrics


def make(config: dict[str, Any]) -> CharLMWorkload:
    """The workload factory (``examples.charlm:make``)."""
    return CharLMWorkload(config)
