"""TorchWorkload: every protocol hook (docs/protocol.md section 1) from a model, an
optimizer, a loss and two data sources, each a plain callable.

```python
def make(config):                     # the factory a worker builds: --workload mylab.train:make
    return TorchWorkload(
        model=Net,                                              # () -> nn.Module
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        train_data=lambda shard_paths: DataLoader(...),         # ShardPaths -> batches
        eval_data=lambda split: DataLoader(...),                # "Validation" -> batches
        config=config,
    )
```

A batch is whatever the data sources yield (a tensor, a tuple/list or dict of tensors,
nested); it is moved to the model's device before ``loss`` sees it. One inner step is
one optimizer step over ``grad_accumulation_steps`` batches.

**Data.** ``train_data(shard_paths)`` gets the local shard files of the step's BatchRef
(a :class:`ShardPaths`, a list of absolute paths on this worker). A BatchRef that names
no shards (a DiLoCo run without a dataset) gives an empty list whose ``replica`` and
``num_replicas`` say which share of its own data the replica should draw. Each BatchRef's
batches are cycled to fill the inner steps.

**Determinism.** ``run_inner_loop`` seeds torch, Python's ``random`` and numpy from its
inputs (the config's ``seed``, the input pack's digest, the BatchRefs' microshard ids,
ordinals, lease and payload, the step count), and starts each data iterator afresh, so a
re-run of a replica (any attempt, any worker) is bit-identical on CPU. The seed leaves
out the attempt and the worker on purpose: a re-run must reproduce the lost attempt.

**State.** ``init_model`` returns ``{"model", "optimizer"}`` (and ``"scheduler"``),
which fleet's generic codec packs (the model part only). The inner optimizer's and the
scheduler's states are saved together to ``inner_optimizer_state_path``
(:data:`WORKLOAD_STATE_ENCODING`), so a scheduler's position carries across rounds.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleet import progress
from fleet.data.batches import shard_paths_of
from fleet.errors import DeadlineExceeded, WorkloadDataError
from fleet.torch_state import INNER_STATE_ENCODING, load_inner_state, save_inner_state
from fleet.workloads.merge_hooks import MergeHooks

#: ``inner_optimizer_state_encoding`` of the file TorchWorkload writes (fleet's own).
WORKLOAD_STATE_ENCODING = INNER_STATE_ENCODING

#: Steps the capability probe times (after one untimed warm-up step).
PROBE_STEPS = 5

#: Training loaders kept per process (one per shard group), and iterators per stream;
#: the least recently used are dropped.
LOADER_CACHE_SIZE = 16


class ShardPaths(list[str]):
    """What ``train_data`` gets: the local shard files of a BatchRef (absolute paths on
    this worker), and for a BatchRef that names none, which share of its own data the
    replica draws (``replica`` of ``num_replicas``; 0 of 1 outside DiLoCo)."""

    def __init__(self, paths: Iterable[str] = (), *, replica: int = 0, num_replicas: int = 1):
        super().__init__(paths)
        self.replica = replica
        self.num_replicas = num_replicas

    @classmethod
    def of(cls, batch: dict[str, Any] | None) -> ShardPaths:
        """The shard paths of a BatchRef, with its ``payload.replica`` / ``num_replicas``."""
        payload = (batch or {}).get("payload")
        payload = payload if isinstance(payload, dict) else {}
        return cls(
            shard_paths_of(batch),
            replica=int(payload.get("replica", 0)),
            num_replicas=int(payload.get("num_replicas", 1)),
        )

    def key(self) -> tuple[Any, ...]:
        return (*self, self.replica, self.num_replicas)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device`` (tensors, and tuples, lists,
    named tuples and mappings of them, nested); anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def examples_in(batch: Any) -> int:
    """The examples in a batch: the first dimension of its first tensor (1 if none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, Iterable) and not isinstance(values, str | bytes):
        for value in values:
            n = examples_in(value)
            if n:
                return n
    return 0


def _batch_identity(batch: dict[str, Any]) -> list[Any]:
    """What a BatchRef says about its data, without worker-local paths."""
    payload = batch.get("payload")
    payload = (
        {k: v for k, v in payload.items() if k not in ("shard_paths", "dataset_root")}
        if isinstance(payload, dict)
        else payload
    )
    return [batch.get("microshard_ids"), batch.get("ordinals"), batch.get("lease_id"), payload]


class _Streams:
    """Cycling iterators over ``train_data`` per shard group. Loaders are cached per
    process (LRU); iterators live as long as this object (one inner loop, or the
    workload's ``train_window`` calls)."""

    def __init__(self, loaders: OrderedDict[tuple[Any, ...], Iterable[Any]], make: Any) -> None:
        self.loaders = loaders
        self.make = make
        self.iters: OrderedDict[tuple[Any, ...], Iterator[Any]] = OrderedDict()

    def _loader(self, shards: ShardPaths) -> Iterable[Any]:
        key = shards.key()
        if key in self.loaders:
            self.loaders.move_to_end(key)
        else:
            self.loaders[key] = self.make(shards)
            while len(self.loaders) > LOADER_CACHE_SIZE:
                self.loaders.popitem(last=False)
        return self.loaders[key]

    def next(self, shards: ShardPaths) -> Any:
        """The next batch for ``shards``, starting over when its loader is exhausted.

        Raises:
            WorkloadDataError: ``train_data`` gave no batch at all for these shards.
        """
        key = shards.key()
        it = self.iters.get(key)
        if it is not None:
            self.iters.move_to_end(key)
        for _ in range(2):
            if it is None:
                it = self.iters[key] = iter(self._loader(shards))
                while len(self.iters) > LOADER_CACHE_SIZE:
                    self.iters.popitem(last=False)
            try:
                return next(it)
            except StopIteration:
                it = None
        raise WorkloadDataError("train_data", f"no batches for shards {list(shards)[:4]}")


class TorchWorkload(MergeHooks):
    """A burn_p2p workload (docs/protocol.md section 1) for an ordinary PyTorch model.

    Args:
        model: ``() -> nn.Module``, called once per model state (seeded with ``seed``,
            so every worker builds the same initial weights).
        optimizer: ``params -> torch.optim.Optimizer``: the inner optimizer.
        loss: ``(model, batch) -> scalar tensor``, the mean loss of the batch.
        train_data: ``ShardPaths -> iterable of batches`` (a DataLoader, a list, ...).
        eval_data: ``split -> iterable of batches`` for ``"Train"``, ``"Validation"``,
            ``"Test"`` (a custom split arrives as its name).
        config: the factory's JSON config (``seed``: int, default 0).
        scheduler: ``optimizer -> LRScheduler``, stepped after every optimizer step; its
            state is carried across rounds with the optimizer's.
        metrics: ``(model, batch) -> {name: float}``, averaged over the eval batches
            (weighted by examples) beside ``loss``.
        autocast: a floating dtype (``torch.bfloat16``, or its name) for
            ``torch.autocast`` around the forward pass and loss; float16 on CUDA adds a
            ``GradScaler``.
        clip_grad_norm: max total gradient norm (``clip_grad_norm_``), or None.
        grad_accumulation_steps: batches per optimizer step (losses averaged).
        name: the workload's name (``workload_name``; default: the model's name).
    """

    def __init__(
        self,
        *,
        model: Callable[[], nn.Module],
        optimizer: Callable[[Any], torch.optim.Optimizer],
        loss: Callable[[nn.Module, Any], torch.Tensor],
        train_data: Callable[[ShardPaths], Iterable[Any]],
        eval_data: Callable[[str], Iterable[Any]],
        config: dict[str, Any] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        metrics: Callable[[nn.Module, Any], Mapping[str, float]] | None = None,
        autocast: torch.dtype | str | None = None,
        clip_grad_norm: float | None = None,
        grad_accumulation_steps: int = 1,
        name: str | None = None,
    ) -> None:
        if grad_accumulation_steps < 1:
            raise ValueError(f"grad_accumulation_steps must be >= 1, got {grad_accumulation_steps}")
        self.model_factory = model
        self.optimizer_factory = optimizer
        self.loss_fn = loss
        self.train_data = train_data
        self.eval_data = eval_data
        self.config = dict(config or {})
        self.scheduler_factory = scheduler
        self.metrics_fn = metrics
        self.autocast = getattr(torch, autocast) if isinstance(autocast, str) else autocast
        self.clip_grad_norm = clip_grad_norm
        self.grad_accumulation_steps = grad_accumulation_steps
        self.seed = int(self.config.get("seed", 0))
        self.workload_name = name or getattr(model, "__name__", "torch-workload")
        self._loaders: OrderedDict[tuple[Any, ...], Iterable[Any]] = OrderedDict()
        self._window_streams = _Streams(self._loaders, self.train_data)

    # ------------------------------------------------------------------ hooks

    def runtime_device(self) -> str:
        return "python-torch-cuda" if torch.cuda.is_available() else "python-torch-cpu"

    def init_model(self, device: str) -> dict[str, Any]:
        """A new state ``{"model", "optimizer"[, "scheduler"][, "grad_scaler"]}`` on
        ``device`` (a scaler for float16 autocast on CUDA), the model's weights drawn with
        torch seeded by the config's ``seed``."""
        torch.manual_seed(self.seed)
        model = self.model_factory().to(device)
        optimizer = self.optimizer_factory(model.parameters())
        state: dict[str, Any] = {"model": model, "optimizer": optimizer}
        if self.scheduler_factory is not None:
            state["scheduler"] = self.scheduler_factory(optimizer)
        if self.autocast is torch.float16 and torch.device(device).type == "cuda":
            state["grad_scaler"] = torch.amp.GradScaler("cuda")
        return state

    def capability_probe(self) -> dict[str, Any]:
        """Optimizer steps (batches, with accumulation 1) per second on the worker's device,
        timed over :data:`PROBE_STEPS` steps of a throwaway model on validation batches."""
        from fleet.devices import AUTO, resolve_device

        state = self.init_model(resolve_device(AUTO))
        batches = list(_take(self.eval_data("Validation"), 2))
        if not batches:
            raise WorkloadDataError("eval_data", "no batches for the 'Validation' split")
        draw = itertools.cycle(batches).__next__
        self._step(state, draw)
        _synchronize(state["model"])
        start = time.perf_counter()
        for _ in range(PROBE_STEPS):
            self._step(state, draw)
        _synchronize(state["model"])
        per_s = PROBE_STEPS * self.grad_accumulation_steps / (time.perf_counter() - start)
        backends = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        return {
            "preferred_backends": backends,
            "work_units_per_second": per_s,
            "target_window_seconds": 10,
        }

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step per BatchRef (one step for an empty list); the data
        iterators continue from one call to the next."""
        losses: list[float] = []
        examples = 0
        refs: list[dict[str, Any] | None] = list(batches) or [None]
        for batch in refs:
            draw = functools.partial(self._window_streams.next, ShardPaths.of(batch))
            loss, n = self._step(state, draw)
            losses.append(loss)
            examples += n
        return {"loss": sum(losses) / len(losses), "examples": examples}

    def run_inner_loop(self, state: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """``num_inner_steps`` optimizer steps, cycling through ``params["batches"]``,
        seeded from the request (module docstring), reporting progress between steps;
        the optimizer and scheduler states restored from and saved to
        ``inner_optimizer_state_path`` when the request names one."""
        steps_total = int(params["num_inner_steps"])
        refs = list(params.get("batches") or [])
        opt_path = params.get("inner_optimizer_state_path")
        if opt_path and Path(opt_path).exists():
            self._load_state(state, Path(opt_path))
        self._seed_from(params)
        streams = _Streams(self._loaders, self.train_data)
        losses: list[float] = []
        n = steps = 0
        try:
            for step in range(steps_total):
                shards = ShardPaths.of(refs[step % len(refs)] if refs else None)
                loss, n = self._step(state, functools.partial(streams.next, shards))
                if math.isfinite(loss):
                    losses.append(loss)
                steps = step + 1
                progress.report(steps, loss=loss, examples=n)
        except DeadlineExceeded:
            if params.get("require_exact_steps", True):
                raise
        metrics: dict[str, Any] = {"examples": n}  # per step, as fleet's own loop reports
        if losses:
            metrics |= {"loss": losses[-1], "mean_loss": sum(losses) / len(losses)}
        out: dict[str, Any] = {"steps_completed": steps, "metrics": metrics}
        if opt_path:
            save_inner_state(state["optimizer"], state.get("scheduler"), Path(opt_path))
            out["inner_optimizer_state_path"] = str(opt_path)
            out["inner_optimizer_state_encoding"] = WORKLOAD_STATE_ENCODING
        return out

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        """Mean ``loss`` (and ``metrics``) over every batch of ``eval_data(split)``,
        weighted by each batch's examples; ``examples`` and ``batches`` counted."""
        name = split if isinstance(split, str) else str(split.get("Custom", split))
        model: nn.Module = state["model"]
        device = _device_of(model)
        totals: dict[str, float] = {}
        examples = batches = 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for raw in self.eval_data(name):
                    batch = to_device(raw, device)
                    n = examples_in(batch) or 1
                    with self._autocast(device):
                        values = {"loss": float(self.loss_fn(model, batch))}
                        if self.metrics_fn is not None:
                            values |= {
                                k: float(v) for k, v in self.metrics_fn(model, batch).items()
                            }
                    for key, value in values.items():
                        totals[key] = totals.get(key, 0.0) + value * n
                    examples += n
                    batches += 1
        finally:
            model.train(was_training)
        if not batches:
            raise WorkloadDataError("eval_data", f"no batches for the {name!r} split")
        return {
            **{k: v / examples for k, v in totals.items()},
            "examples": examples,
            "batches": batches,
        }

    # ------------------------------------------------------------------ the step

    def _autocast(self, device: torch.device) -> Any:
        return torch.autocast(
            device_type=device.type, dtype=self.autocast, enabled=self.autocast is not None
        )

    def _step(self, state: dict[str, Any], draw: Callable[[], Any]) -> tuple[float, int]:
        """One optimizer step over ``grad_accumulation_steps`` drawn batches; returns the
        mean loss and the examples seen."""
        model: nn.Module = state["model"]
        optimizer: torch.optim.Optimizer = state["optimizer"]
        device = _device_of(model)
        scaler = state.get("grad_scaler")
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total, examples, k = 0.0, 0, self.grad_accumulation_steps
        for _ in range(k):
            batch = to_device(draw(), device)
            with self._autocast(device):
                loss = self.loss_fn(model, batch) / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
            examples += examples_in(batch)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if "scheduler" in state:
            state["scheduler"].step()
        return total, examples

    # ------------------------------------------------------------------ seeds and state

    def _seed_from(self, params: dict[str, Any]) -> None:
        pack = params.get("input_parameter_pack") or {}
        ident = {
            "seed": self.seed,
            "input": pack.get("values_digest") if isinstance(pack, dict) else None,
            "batches": [_batch_identity(b) for b in params.get("batches") or []],
            "steps": params.get("num_inner_steps"),
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).digest()
        seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % (1 << 32))
        except ImportError:  # numpy is optional for a torch workload
            pass

    def _load_state(self, state: dict[str, Any], path: Path) -> None:
        load_inner_state(
            state["optimizer"], state.get("scheduler"), path, _device_of(state["model"])
        )


def _take(items: Iterable[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _synchronize(model: nn.Module) -> None:
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()
