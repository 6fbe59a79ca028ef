"""The worker's side of a DiLoCo replica's round, in one place (docs/protocol.md section
5.7; as torchft's ``_StreamingDiLoCoFragment`` owns a fragment's round).

One attempt (:func:`replica_round`, the ``fleet.replica_round`` task's body):

1. the round's global model ``theta_r`` on this worker's disk (:class:`~fleet.diloco.
   globals.GlobalModels`: held, or the last outer step applied to the model held, or
   caught up from a full checkpoint), loaded into the replica's model;
2. the replica's state: its inner optimizer state and error-feedback residual as its
   last merged attempt left them on this worker (:class:`ReplicaFiles`; when the model
   handle's optimizer still holds that state in memory, nothing is loaded), else its
   last published checkpoint, else fresh;
3. the inner steps (:func:`fleet.inner_loop.run_loop`: the workload's hook or fleet's
   loop);
4. the pseudo-gradient ``theta_r - theta_i + e`` encoded by the run's codec with error
   feedback (:func:`fleet.diloco.exchange.publish_pseudo_gradient`), published to the
   shared root: the one thing that crosses the link on the critical path; the new
   residual and optimizer state stay here, under this attempt's directory;
5. with a checkpoint path, the replica's state published in the background
   (:mod:`fleet.diloco.uploads`).

Streaming DiLoCo (a request with a ``fragment``, :mod:`fleet.diloco.fragments`): the
replica's own parameters after its attempt stay on the worker too, and the next
attempt starts from them, with the fragments synchronised since then mixed in from the
global model; only the round's fragment of the pseudo-gradient is sent. An attempt
that finds no parameters of its own here (the first round, a re-run on another worker)
starts from the global model.

An attempt's files are keyed by ``(round, attempt)``, so a re-run on the same worker
starts from the same state and reproduces the same bits; a re-run elsewhere starts
from the last checkpoint (not bit-identical to the lost attempt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fleet import progress
from fleet.codec.codecs import codec_for
from fleet.codec.manifest import read_manifest
from fleet.codec.pack import mix_range_into
from fleet.data.localize import local_batches
from fleet.diloco.exchange import Published, publish_pseudo_gradient
from fleet.diloco.fragments import (
    fragment_of_round,
    fragment_ranges,
    fragments_to_mix,
    write_mixed_pack,
)
from fleet.diloco.globals import (
    GlobalModels,
    HeldGlobal,
    copy_tree,
    publish_file,
    publish_tree,
    run_dir,
)
from fleet.diloco.uploads import Upload, background_uploads
from fleet.errors import CodecError
from fleet.inner_loop import run_loop
from fleet.jobs import JobStore
from fleet.model_packs import load_pack_into_held, publish_state_pack
from fleet.protocol import ReplicaCheckpoint, ReplicaRoundRequest, ReplicaRoundResult, ReplicaStart
from fleet.runtime import HeldModel, WorkerRuntime
from fleet.storage import PackRef, Store

log = logging.getLogger("fleet.diloco")

#: An attempt's files: the inner optimizer state the loop wrote, the new residual (a v1
#: pack), and its record (written last: the attempt finished).
OPTIMIZER_FILE = "optimizer"
RESIDUAL_DIR = "residual"
#: The replica's parameters after its inner steps (a v1 pack; kept for Streaming DiLoCo).
PARAMETERS_DIR = "parameters"
RECORD_FILE = "attempt.json"
_ATTEMPT = re.compile(r"^r(\d+)-a(\d+)$")


@dataclass(frozen=True)
class StartState:
    """Where an attempt's replica state comes from: an optimizer state file (and its
    encoding), a residual pack and the replica's own parameters (Streaming DiLoCo) on
    local disk (any may be None), and which source gave them (``held``,
    ``checkpoint``, ``fresh``)."""

    optimizer: Path | None
    encoding: str | None
    residual: Path | None
    source: str
    parameters: Path | None = None


class ReplicaFiles:
    """A replica's state on its worker: ``<run dir>/replica-<i>/r<round>-a<attempt>/``."""

    def __init__(self, root: Path, replica: int) -> None:
        self.root = root / f"replica-{replica}"

    def attempt(self, round_index: int, attempt: int) -> Path:
        return self.root / f"r{round_index}-a{attempt}"

    def finished(self, round_index: int, attempt: int) -> Path | None:
        """The directory of that attempt if it finished on a worker sharing this disk."""
        path = self.attempt(round_index, attempt)
        return path if (path / RECORD_FILE).is_file() else None

    def start(self, start: ReplicaStart, store: Store) -> StartState:
        """The state ``start`` names, on local disk (see :class:`StartState`).

        Raises:
            CodecError, StorageError: the checkpoint it falls back to is missing or
                corrupt.
        """
        if start.round is not None and start.attempt is not None:
            path = self.finished(start.round, start.attempt)
            if path is not None:
                record = json.loads((path / RECORD_FILE).read_text())
                optimizer = path / OPTIMIZER_FILE
                residual = path / RESIDUAL_DIR
                parameters = path / PARAMETERS_DIR
                return StartState(
                    optimizer if optimizer.is_file() else None,
                    record.get("optimizer_encoding"),
                    residual if residual.is_dir() else None,
                    "held",
                    parameters if (parameters / "manifest.json").is_file() else None,
                )
        checkpoint = start.checkpoint
        if checkpoint is not None:
            fetched = store.local_file(checkpoint.optimizer) if checkpoint.optimizer else None
            carried = None
            if checkpoint.residual is not None:
                carried = store.local_pack(checkpoint.residual.path, checkpoint.residual)
            return StartState(fetched, checkpoint.optimizer_encoding, carried, "checkpoint")
        return StartState(None, None, None, "fresh")

    def prune(self, keep_from: int, keep: tuple[int, int] | None) -> None:
        """Delete attempts of rounds before ``keep_from``, but ``keep`` ``(round,
        attempt)``; every other attempt of ``keep``'s round too."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            match = _ATTEMPT.match(path.name)
            if match is None:
                continue
            key = (int(match[1]), int(match[2]))
            old = key[0] < keep_from or (keep is not None and key[0] == keep[0])
            if old and key != keep:
                shutil.rmtree(path, ignore_errors=True)


def replica_round(rt: WorkerRuntime, req: ReplicaRoundRequest) -> ReplicaRoundResult:
    """Run one attempt of a DiLoCo replica's round (see the module docstring).

    Raises:
        StepBudgetError: ``require_exact_steps`` and another step count.
        DeadlineExceeded: past the deadline with ``require_exact_steps``.
        TaskAborted: asked to abort.
        GlobalDigestMismatchError: the global model rebuilt here is not the committed one.
        CodecError, StorageError: a pack it reads is missing or corrupt (the error names
            it), or the store failed.
    """
    store = rt.shared
    out_rel = store.relative(req.output_path)
    key = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
    recorded = store.recorded_result(out_rel, key, ReplicaRoundResult)
    if recorded is not None:  # a redelivered message: it ran already, to completion
        log.info("already ran: returning the published %s", req.output_path)
        return recorded  # type: ignore[no-any-return]
    held = rt.held(req.model_id, tracks_loaded=True)
    counted, requests_before = store.counters.snapshot(), store.counters.requests
    started_at, started = time.time(), time.perf_counter()
    root = run_dir(rt.settings.cache_dir, req.run)
    models = GlobalModels(store, root)
    base = models.resolve(req.global_model)
    files = ReplicaFiles(root, req.replica)
    begin = files.start(req.start, store)
    # Streaming DiLoCo from the replica's own parameters: those are loaded instead (the
    # global model's digest is checked where it is read: the mix, the encode)
    if req.fragment is None or begin.parameters is None:
        try:  # the load reads it whole, checking its digest: a model held here may rot
            load_pack_into_held(held, base.path, req.state_dict_filter, base.ref())
        except CodecError as exc:
            log.warning(
                "the global model held here is corrupt (%s: %s); fetching it again",
                type(exc).__name__,
                exc,
            )
            models.forget_models()
            base = models.resolve(req.global_model)
            load_pack_into_held(held, base.path, req.state_dict_filter, base.ref())
    base_ref = base.ref()
    batches = local_batches(rt, req.batches, req.shard_checks)
    here = files.attempt(req.round, req.attempt)
    shutil.rmtree(here, ignore_errors=True)  # a failed earlier try of this very attempt
    here.mkdir(parents=True)
    spec = req.exchange
    value_range, late = None, None
    if req.fragment is not None:
        value_range = _start_streaming(held, req, base, begin, here)
        if req.fragment.late_step is not None:
            late = LateMix(models, base, req, here)
    opt_path = here / OPTIMIZER_FILE
    in_memory = (req.run, req.replica, req.start.round, req.start.attempt)
    if begin.optimizer is not None and not (begin.source == "held" and held.state_key == in_memory):
        shutil.copyfile(begin.optimizer, opt_path)  # the loop loads it
    held.loaded = held.state_key = None  # the steps change the state
    params_path = here / PARAMETERS_DIR
    params = {
        "model_id": req.model_id,
        "batches": batches,
        "num_inner_steps": req.num_inner_steps,
        "inner_optimizer_state_path": str(opt_path),
        "output_parameter_pack_path": str(params_path),
        "model_schema_hash": req.model_schema_hash,
        "require_exact_steps": req.require_exact_steps,
        "state_dict_filter": req.state_dict_filter.model_dump() if req.state_dict_filter else None,
        "deadline_unix_s": req.deadline_unix_s,
        "input_parameter_pack": base_ref.model_dump(mode="json"),
    }
    loaded = time.perf_counter()
    with late.stepping() if late is not None else contextlib.nullcontext():
        if late is not None:
            late.arm(held)
        loop = run_loop(held, params, batches, opt_path)
        trained = time.perf_counter()
        if not (params_path / "manifest.json").is_file():
            publish_state_pack(
                held.workload,
                held.state,
                params_path,
                req.model_schema_hash,
                req.state_dict_filter,
            )
        if late is not None:
            base = late.finish(params_path, loop.steps)
    feedback = spec.error_feedback
    residual_out = here / RESIDUAL_DIR if feedback else None
    with models.new_delta() as delta:

        def encode(from_model: Path) -> Published:
            return publish_pseudo_gradient(
                from_model,
                params_path,
                delta,
                codec_for(spec.codec, spec.block_size),
                residual=begin.residual if feedback else None,
                out_residual=residual_out,
                base_digest=base.values_digest,
                value_range=value_range,
            )

        try:  # the base is read whole again here, its digest checked
            published = encode(base.path)
        except CodecError as exc:
            if not str(exc.path or "").startswith(str(base.path)):
                raise
            log.warning("the global model held here is corrupt (%s: %s); fetching it again",
                        type(exc).__name__, exc)  # fmt: skip
            models.forget_models()
            base = models.resolve(req.global_model)
            if late is not None:
                base = models.step(base, late.step)
            published = encode(base.path)
        encoded = time.perf_counter()
        publish_tree(store, delta, out_rel)
        uploaded = time.perf_counter()
        models.keep_delta(delta, published.pseudo_gradient.values_digest)
    if req.fragment is None:  # else the next attempt starts from them
        shutil.rmtree(params_path, ignore_errors=True)
    encoding = loop.result.get("inner_optimizer_state_encoding")
    record = {"optimizer_encoding": encoding, "finished_at": time.time()}
    (here / RECORD_FILE).write_text(json.dumps(record))
    held.state_key = (req.run, req.replica, req.round, req.attempt)
    rt.registry.touch(req.model_id, bump_generation=True)
    if req.checkpoint_path is not None:
        _checkpoint_replica(rt, req, here, encoding)
    files.prune(req.start.round if req.start.round is not None else 0, (req.round, req.attempt))
    models.prune()
    pg = published.pseudo_gradient
    sent, received = store.counters.since(counted)
    requests = store.counters.requests - requests_before
    result = ReplicaRoundResult(
        steps_completed=loop.steps,
        metrics=loop.metrics,
        pack=PackRef(
            path=out_rel,
            layout_hash=pg.layout_hash,
            values_digest=pg.values_digest,
            model_schema_hash=pg.model_schema_hash,
            parameter_count=pg.parameter_count,
        ),
        base_digest=base.values_digest,
        global_source=base.source,  # type: ignore[arg-type]
        steps_replayed=base.steps_replayed,
        state_source=begin.source,  # type: ignore[arg-type]
        checkpoint_scheduled=req.checkpoint_path is not None,
        sent_bytes=sent,
        received_bytes=received,
        store_requests=requests,
        load_s=loaded - started,
        compute_s=loop.compute_s,
        save_s=(trained - loaded) - loop.compute_s,
        encode_s=encoded - trained,
        publish_s=uploaded - encoded,
        started_at=started_at,
        finished_at=started_at + (uploaded - started),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        late_mix_step=late.mixed_at if late is not None else None,
        late_mix_s=late.mix_s if late is not None else 0.0,
    )
    store.record_result(out_rel, key, result)
    return result


def _start_streaming(
    held: HeldModel, req: ReplicaRoundRequest, base: HeldGlobal, begin: StartState, here: Path
) -> tuple[int, int]:
    """Streaming DiLoCo: load the replica's own parameters after its last merged attempt
    (if this worker holds them; the global model stays loaded otherwise) with the
    fragments synchronised since then mixed in from the global model ``base``, and
    return the values ``[start, stop)`` of the fragment this round sends.

    Raises:
        FragmentSplitError: the model is too small for the fragments.
        CodecError: the parameters kept here are corrupt or of another layout.
    """
    fragment = req.fragment
    assert fragment is not None
    count = int(read_manifest(base.path).parameter_count)
    exchange = req.exchange
    all_ranges = fragment_ranges(count, fragment.count, exchange.codec, exchange.block_size)
    sent = all_ranges[fragment.index]
    if begin.parameters is None:
        log.info("fragment %d of %d: starts from the global model", fragment.index, fragment.count)
        return sent
    # a late step's fragment is mixed in after the first inner steps (LateMix), from the
    # model that step gives: here only those synchronised before it, from global_model
    until = req.round - 1 if fragment.late_step is not None else req.round
    mixed = sorted(fragments_to_mix(req.start.round, until, fragment.count))
    if not mixed:
        log.info("fragment %d of %d: starts from its own parameters of round %s",
                 fragment.index, fragment.count, req.start.round)  # fmt: skip
        load_pack_into_held(held, begin.parameters, req.state_dict_filter)
        return sent
    ranges = [all_ranges[f] for f in mixed]
    log.info(
        "fragment %d of %d: starts from its own parameters of round %s, fragments %s mixed in",
        fragment.index, fragment.count, req.start.round, mixed,
    )  # fmt: skip
    start = here / "start-parameters"
    write_mixed_pack(
        start, begin.parameters, base.path, ranges, fragment.mixing,
        global_digest=base.values_digest,
    )  # fmt: skip
    load_pack_into_held(held, start, req.state_dict_filter)
    shutil.rmtree(start, ignore_errors=True)
    return sent


class LateMix:
    """Pipelined Streaming DiLoCo (``fragment.late_step``; arXiv:2501.18512 section 2.3,
    the overlap tau): the previous round's outer step applied to ``base`` on a thread of
    its own (:meth:`stepping`) while the first inner steps run, and its fragment mixed
    into the replica's parameters after ``fragment.delay_steps`` of them.

    The mix happens between two steps (:meth:`arm`: at the step the loop reports through
    :func:`fleet.progress.report`, on the held model's tensors, in place, reading the
    fragment's values only: :func:`fleet.codec.pack.mix_range_into`) or, for a loop that
    reports no steps or a workload that loads packs through its
    ``import_parameter_pack_path`` hook, into the parameters pack after the loop
    (:meth:`finish`). Either way the pseudo-gradient is taken against the stepped model.
    """

    def __init__(self, models: GlobalModels, base: HeldGlobal, req: ReplicaRoundRequest,
                 here: Path) -> None:  # fmt: skip
        fragment = req.fragment
        assert fragment is not None and fragment.late_step is not None
        self.models, self.base, self.here = models, base, here
        self.step = fragment.late_step
        self.delay_steps = fragment.delay_steps
        self.alpha = fragment.mixing
        self.filter = req.state_dict_filter
        count = int(read_manifest(base.path).parameter_count)
        ranges = fragment_ranges(count, fragment.count, req.exchange.codec, req.exchange.block_size)
        self.range = ranges[fragment_of_round(self.step.round, fragment.count)]
        self.mixed_at: int | None = None
        """The inner steps done when the fragment was mixed in."""
        self.mix_s = 0.0
        """Seconds the mix took, waiting for the step included."""
        self._future: Future[HeldGlobal] | None = None
        self._held: HeldModel | None = None

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Apply the late step on a thread while the block runs (joined when it ends)."""
        with ThreadPoolExecutor(1, thread_name_prefix="fleet-late-step") as pool:
            self._future = pool.submit(self.models.step, self.base, self.step)
            try:
                yield
            finally:
                monitor = progress.current()
                if monitor is not None:
                    monitor.take(self.delay_steps)

    def arm(self, held: HeldModel) -> None:
        """Mix in after ``delay_steps`` inner steps, if the loop reports them and the
        model loads in place."""
        monitor = progress.current()
        if monitor is None or held.workload.has("import_parameter_pack_path"):
            return
        self._held = held
        if self.delay_steps == 0:
            self._mix_held()
        else:
            monitor.call_at(self.delay_steps, self._mix_held)

    def stepped(self) -> HeldGlobal:
        """The late step's model (waits for the thread).

        Raises:
            GlobalDigestMismatchError, CodecError, StorageError: as
                :meth:`GlobalModels.step`.
        """
        assert self._future is not None
        return self._future.result()

    def _mix_held(self) -> None:
        started = time.perf_counter()
        held = self._held
        assert held is not None
        stepped = self.stepped()  # this worker wrote it, or checked it coming in
        mix_range_into(stepped.path, held.state, self.range, self.alpha,
                       state_dict_filter=self.filter)  # fmt: skip
        held.loaded = None  # the next steps change it
        self.mixed_at = self.delay_steps
        self.mix_s = time.perf_counter() - started
        log.info("fragment of round %d mixed in after %d inner steps (%.2fs)",
                 self.step.round, self.delay_steps, self.mix_s)  # fmt: skip

    def finish(self, params: Path, steps: int) -> HeldGlobal:
        """After the loop: mix the fragment into the parameters pack ``params`` if it was
        not mixed during the loop; the late step's model, to take the pseudo-gradient
        against."""
        stepped = self.stepped()
        if self.mixed_at is None:
            started = time.perf_counter()
            mixed = self.here / "late-mixed"
            write_mixed_pack(mixed, params, stepped.path, [self.range], self.alpha,
                             global_digest=stepped.values_digest)  # fmt: skip
            shutil.rmtree(params)
            os.rename(mixed, params)
            self.mixed_at = steps
            self.mix_s = time.perf_counter() - started
            log.info("fragment of round %d mixed in after the loop's %d steps",
                     self.step.round, steps)  # fmt: skip
        return stepped


def _checkpoint_replica(
    rt: WorkerRuntime, req: ReplicaRoundRequest, here: Path, encoding: str | None
) -> None:
    """Publish this attempt's optimizer state and residual at ``req.checkpoint_path`` in
    the background, and record the checkpoint once it landed."""
    assert req.checkpoint_path is not None
    store, rel = rt.shared, rt.shared.relative(req.checkpoint_path)
    staging = run_dir(rt.settings.cache_dir, req.run) / ".uploads" / uuid.uuid4().hex
    copy_tree(here, staging / "files", link=True)  # private: the next round may prune `here`
    if (here / RESIDUAL_DIR).is_dir():
        copy_tree(here / RESIDUAL_DIR, staging / RESIDUAL_DIR, link=True)
    jobs = JobStore(rt.registry)
    what = f"replica/{req.replica}/{req.round}/{req.attempt}"

    def upload() -> None:
        optimizer = None
        if (staging / "files" / OPTIMIZER_FILE).is_file():
            optimizer = f"{rel}/{OPTIMIZER_FILE}"
            publish_file(store, staging / "files" / OPTIMIZER_FILE, optimizer)
        residual = None
        if (staging / RESIDUAL_DIR).is_dir():
            publish_tree(store, staging / RESIDUAL_DIR, f"{rel}/{RESIDUAL_DIR}")
            residual = PackRef.of(f"{rel}/{RESIDUAL_DIR}", read_manifest(staging / RESIDUAL_DIR))
        checkpoint = ReplicaCheckpoint(
            round=req.round,
            attempt=req.attempt,
            optimizer=optimizer,
            optimizer_encoding=encoding if optimizer else None,
            residual=residual,
        )
        jobs.record_checkpoint(req.run, what, checkpoint.model_dump_json())

    background_uploads().submit(Upload(what, upload, staging))


__all__ = ["LateMix", "ReplicaFiles", "StartState", "replica_round"]
