"""A worker's global models of a DiLoCo run (docs/protocol.md section 5.7): kept on its
local disk by digest, reached from what it holds by applying committed outer steps, and
checked against the digests the run committed.

Every replica's worker keeps the global model it trained from (``theta_r``) and the
outer optimizer's buffers (``m_r``), each a v1 pack in the run's directory
``<cache_dir>/diloco/<run>/`` named by its values digest. When round ``r`` commits, what
crosses the link to a worker is only the round's encoded pseudo-gradients; the worker
applies the outer step itself (:func:`fleet.diloco.outer.stream_outer_step`, bit-exact
and deterministic: the same inputs give the same bits on every worker) and checks the
result against the committed digest. A worker that holds none of the models a
:class:`~fleet.protocol.GlobalModelSpec` leads through (new, restarted, its disk wiped)
fetches the spec's full checkpoint and applies the steps since (catch-up). As in
INTELLECT-1 (arXiv:2412.01152) and torchft's DiLoCo, every worker applies the outer
optimizer itself; unlike them the pseudo-gradients meet on the shared root, not in an
all-reduce.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fleet.codec.manifest import MANIFEST_FILE, read_manifest
from fleet.codec.pack import is_pack
from fleet.codec.readers import open_reader
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import CHUNK_BYTES, PackInput, stream_outer_step
from fleet.errors import CodecError, GlobalDigestMismatchError, NotAPackError
from fleet.files import publishing
from fleet.protocol import FullCheckpoint, GlobalModelSpec, OuterStepSpec
from fleet.storage import PackRef, Store

log = logging.getLogger("fleet.diloco")

#: Global models (and buffer sets) a run's directory keeps: the newest few by last use
#: (the one a round trains from, the one its outer step makes, and one spare).
KEEP_MODELS = 3


def run_dir(cache_dir: Path, run: str) -> Path:
    """Where a worker keeps a run's state (``<cache_dir>/diloco/<run>``).

    Raises:
        ValueError: ``run`` is not a plain name.
    """
    if not run or "/" in run or run.startswith(".") or "\x00" in run:
        raise ValueError(f"not a run id: {run!r}")
    return Path(cache_dir) / "diloco" / run


def _key(digest: str) -> str:
    return digest.replace(":", "-")


def copy_tree(src: Path, dest: Path, *, link: bool) -> None:
    """Make ``dest`` a copy of the directory ``src`` (its files, not below): with
    ``link``, hard links where the file system allows (for files nobody writes in place:
    a worker's own copies), else byte copies."""
    dest.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            if link:
                try:
                    os.link(path, dest / path.name)
                    continue
                except OSError:
                    pass
            shutil.copyfile(path, dest / path.name)


def publish_tree(store: Store, local: Path, rel: str) -> None:
    """Publish the local directory ``local`` (a pack) at ``rel`` on ``store``, atomically
    (docs/protocol.md section 5.5: renamed into place on a local root, manifest last on
    an object store).

    Raises:
        StorageError: the file system or the store failed.
    """
    with store.output(rel) as out, publishing(out, replace_dir=is_pack) as tmp:
        copy_tree(local, tmp, link=not store.is_local)


def publish_file(store: Store, local: Path, rel: str) -> None:
    """Publish the local file ``local`` at ``rel`` on ``store``, atomically.

    Raises:
        StorageError: the file system or the store failed.
    """
    with store.output(rel) as out, publishing(out) as tmp:
        shutil.copyfile(local, tmp)


@dataclass(frozen=True)
class HeldGlobal:
    """A global model on this worker's disk: its v1 pack, its digest, and the outer
    optimizer's buffers that go with it (by name), with how it was reached."""

    path: Path
    values_digest: str
    state: dict[str, Path] = field(default_factory=dict)
    source: str = "held"
    steps_replayed: int = 0

    @property
    def state_digests(self) -> dict[str, str]:
        return {name: _digest_of(path) for name, path in self.state.items()}

    def ref(self) -> PackRef:
        """The PackRef of the model (path: its local directory, for messages)."""
        return PackRef.of(str(self.path), read_manifest(self.path))


def verify_local(path: Path, ref: PackRef | None = None) -> None:
    """Read a local pack once, checking its digest (and ``ref``'s layout hash and digest)
    and that every value is finite.

    Raises:
        CodecError: the pack is corrupt or not the one ``ref`` names.
    """
    import torch

    block = torch.empty(1 << 18, dtype=torch.float32)
    with open_reader(
        path,
        check_finite=True,
        layout_hash=ref.layout_hash if ref else None,
        values_digest=ref.values_digest if ref else None,
    ) as reader:
        while reader.remaining:
            reader.read_into(block)


def _step_key(base: HeldGlobal, step: OuterStepSpec) -> str:
    """The name of what applying ``step`` (digests aside) to ``base`` gave."""
    inputs = step.model_copy(update={"global_digest": None, "state_digests": {}})
    text = json.dumps([base.values_digest, base.state_digests, inputs.model_dump(mode="json")])
    return hashlib.sha256(text.encode()).hexdigest()


def _digest_of(path: Path) -> str:
    digest = read_manifest(path).values_digest
    if digest is None:
        raise NotAPackError(str(path), "no values_digest")
    return digest


class GlobalModels:
    """The global models of run ``run`` on this worker (see the module docstring).

    Args:
        store: the shared root (checkpoints and pseudo-gradients are read from it).
        root: the run's directory on local disk (:func:`run_dir`).
    """

    def __init__(self, store: Store, root: Path) -> None:
        self.store = store
        self.root = root
        self.models = root / "global"
        self.buffers = root / "buffer"
        self.deltas = root / "delta"
        self.stepped = root / "stepped"
        """What each outer step applied here gave (digests, by its inputs): a step
        applied again before it is committed (a pipelined round's late step, on the
        worker that ran the committed one) is found, not recomputed."""
        """The pseudo-gradients this worker encoded, by digest: the outer step reads its
        own replicas' from here, not back from the shared root."""

    # ------------------------------------------------------------------ what is held

    def _pack(self, folder: Path, digest: str) -> Path | None:
        path = folder / _key(digest)
        if (path / MANIFEST_FILE).is_file():
            os.utime(path)  # recently used: kept by prune
            return path
        return None

    def held(self, digest: str, state_digests: dict[str, str]) -> HeldGlobal | None:
        """The global model ``digest`` with buffers ``state_digests``, if this worker
        holds them all."""
        path = self._pack(self.models, digest)
        if path is None:
            return None
        state = {}
        for name, d in state_digests.items():
            buffer = self._pack(self.buffers, d)
            if buffer is None:
                return None
            state[name] = buffer
        return HeldGlobal(path, digest, state)

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        tmp = self.root / ".staging" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _admit(self, folder: Path, staged: Path, digest: str) -> Path:
        """Move a verified pack in under its digest (a copy another process admitted
        first is kept)."""
        dest = folder / _key(digest)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, dest)
        except OSError:
            if not (dest / MANIFEST_FILE).is_file():
                raise
        return dest

    @contextmanager
    def new_delta(self) -> Iterator[Path]:
        """A local path to write a pseudo-gradient pack at (:meth:`keep_delta` keeps it)."""
        with self._staging() as tmp:
            yield tmp / "delta"

    def keep_delta(self, staged: Path, digest: str) -> Path:
        """Keep the pseudo-gradient written at ``staged`` (by :meth:`new_delta`) under its
        digest."""
        return self._admit(self.deltas, staged, digest)

    # ------------------------------------------------------------------ reaching a model

    def resolve(self, spec: GlobalModelSpec, *, chunk_bytes: int = CHUNK_BYTES) -> HeldGlobal:
        """The global model ``spec`` names, on this worker's disk: held already, or
        reached by applying the spec's outer steps to the newest model held along its
        chain, or caught up from its full checkpoint.

        Raises:
            GlobalDigestMismatchError: an outer step applied here gave other bits than
                the run committed.
            CodecError, StorageError: a checkpoint or pseudo-gradient is missing or
                corrupt.
        """
        found = self.held(spec.values_digest, spec.state_digests)
        if found is not None:
            return found
        chain: list[tuple[str, dict[str, str]]] = [
            (
                spec.checkpoint.global_pack.values_digest or "",
                {n: p.values_digest or "" for n, p in spec.checkpoint.state.items()},
            )
        ]
        chain += [(s.global_digest or "", s.state_digests) for s in spec.steps]
        start, current, source = 0, None, "stepped"
        for index in range(len(chain) - 1, -1, -1):
            current = self.held(*chain[index])
            if current is not None:
                start = index
                break
        if current is None:
            current, source = self.fetch(spec.checkpoint), "caught-up"
        try:
            for step in spec.steps[start:]:
                current = self.step(current, step, chunk_bytes=chunk_bytes)
            replayed = len(spec.steps) - start
        except CodecError as exc:
            mine = str(exc.path or "").startswith(str(self.root))
            if source == "caught-up" or not (mine or isinstance(exc, GlobalDigestMismatchError)):
                raise  # a pseudo-gradient on the shared root is bad: the run drops it
            # a model held here rotted, or stepping from it gave other bits: start again
            # from the full checkpoint, fetched afresh
            log.warning(
                "the global model held here is corrupt (%s: %s); catching up from round "
                "%d's checkpoint",
                type(exc).__name__,
                exc,
                spec.checkpoint.round,
            )
            self.forget_models()
            current, source = self.fetch(spec.checkpoint), "caught-up"
            for step in spec.steps:
                current = self.step(current, step, chunk_bytes=chunk_bytes)
            replayed = len(spec.steps)
        how = "stepped"
        if source == "caught-up":
            how = f"caught up from round {spec.checkpoint.round}'s checkpoint"
        log.info("global model of round %d %s (%d outer steps applied)", spec.round, how, replayed)
        return HeldGlobal(current.path, current.values_digest, current.state, source, replayed)

    def fetch(self, checkpoint: FullCheckpoint) -> HeldGlobal:
        """A full checkpoint from the shared root, verified on the way in.

        Raises:
            CodecError, StorageError: missing or corrupt.
        """
        packs = {"": checkpoint.global_pack, **checkpoint.state}
        held: dict[str, Path] = {}
        for name, ref in packs.items():
            folder = self.models if not name else self.buffers
            digest = ref.values_digest or ""
            path = self._pack(folder, digest) if digest else None
            if path is None:
                local = self.store.local_pack(ref.path, ref)
                with self._staging() as tmp:
                    # a verified cache entry may be linked; a pack on a local shared root
                    # is copied and verified here (someone may change it in place)
                    copy_tree(local, tmp / "pack", link=not self.store.is_local)
                    if self.store.is_local:
                        verify_local(tmp / "pack", ref)
                    path = self._admit(folder, tmp / "pack", _digest_of(tmp / "pack"))
            held[name] = path
        top = held.pop("")
        return HeldGlobal(top, _digest_of(top), held, "caught-up")

    def step(
        self, base: HeldGlobal, step: OuterStepSpec, *, chunk_bytes: int = CHUNK_BYTES
    ) -> HeldGlobal:
        """Apply ``step`` to ``base`` on this worker: its pseudo-gradients fetched (and
        verified) into the worker's cache, the outer optimizer streamed over them. With
        the step's committed digests, the result is checked against them.

        Raises:
            GlobalDigestMismatchError: other bits than the committed ones.
            BaseMismatchError: a pseudo-gradient of another base model.
            CodecError, StorageError: a pseudo-gradient is missing or corrupt (the error
                names it).
        """
        if step.global_digest is not None:
            done = self.held(step.global_digest, step.state_digests)
            if done is not None:
                return done
        memo = self.stepped / _step_key(base, step)
        if step.global_digest is None and memo.is_file():  # applied here before
            known = json.loads(memo.read_text())
            done = self.held(known["global"], known["state"])
            if done is not None:
                return HeldGlobal(done.path, done.values_digest, done.state, "stepped", 1)
        optimizer = outer_optimizer(step.outer)
        replicas = []
        for weighted in step.replicas:
            ref = weighted.pack
            local = self._pack(self.deltas, ref.values_digest or "") if ref.values_digest else None
            if local is None:
                local = self.store.local_pack(ref.path, ref)
            replicas.append(PackInput(local, ref.layout_hash, ref.values_digest))
        with self._staging() as tmp:
            try:
                stream_outer_step(
                    PackInput(base.path, None, base.values_digest),
                    replicas,
                    [w.weight for w in step.replicas],
                    {name: PackInput(path) for name, path in base.state.items()},
                    optimizer,
                    step.merge_policy,
                    tmp / "global",
                    {name: tmp / name for name in optimizer.buffers},
                    chunk_bytes=chunk_bytes,
                )
            except CodecError as exc:  # name the pseudo-gradient by its shared-root path
                where = str(exc.path or "")
                for read, weighted in zip(replicas, step.replicas, strict=True):
                    if where.startswith(str(read.path)):
                        exc.path = weighted.pack.path + where[len(str(read.path)) :]
                raise
            digest = _digest_of(tmp / "global")
            if step.global_digest is not None and digest != step.global_digest:
                raise GlobalDigestMismatchError(
                    str(self.root), step.round + 1, step.global_digest, digest
                )
            state = {}
            for name in optimizer.buffers:
                buffer_digest = _digest_of(tmp / name)
                expected = step.state_digests.get(name)
                if step.global_digest is not None and expected not in (None, buffer_digest):
                    raise GlobalDigestMismatchError(
                        str(self.root / name), step.round + 1, str(expected), buffer_digest
                    )
                state[name] = self._admit(self.buffers, tmp / name, buffer_digest)
            path = self._admit(self.models, tmp / "global", digest)
        result = HeldGlobal(path, digest, state, "stepped", 1)
        self.stepped.mkdir(parents=True, exist_ok=True)
        with publishing(memo) as out:
            out.write_text(json.dumps({"global": digest, "state": result.state_digests}))
        return result

    # ------------------------------------------------------------------ publishing

    def publish(self, model: HeldGlobal, path: str, round_index: int) -> FullCheckpoint:
        """Upload ``model`` and its buffers in full to ``path`` (the global pack) and
        ``path``-``<buffer>`` beside it, manifests last (docs/protocol.md section 5.5).

        Raises:
            StorageError: the upload failed (nothing readable is left half-written).
        """
        rel = self.store.relative(path)
        refs: dict[str, PackRef] = {}
        for name, local in [("", model.path), *model.state.items()]:
            target = rel if not name else f"{rel}-{name}"
            publish_tree(self.store, local, target)
            refs[name] = PackRef.of(target, read_manifest(local))
        return FullCheckpoint(round=round_index, global_pack=refs.pop(""), state=refs)

    # ------------------------------------------------------------------ housekeeping

    def prune(self, keep: int = KEEP_MODELS) -> int:
        """Delete all but the ``keep`` most recently used models and buffer sets; return
        the bytes freed."""
        freed = 0
        for folder, per_name in (
            (self.models, keep),
            (self.buffers, 4 * keep),
            (self.deltas, 2 * keep),
            (self.stepped, 4 * keep),
        ):
            if not folder.is_dir():
                continue
            entries = sorted(folder.iterdir(), key=_mtime, reverse=True)
            for old in entries[per_name:]:
                if old.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        freed += old.stat().st_size
                        old.unlink()
                    continue
                freed += _tree_bytes(old)
                shutil.rmtree(old, ignore_errors=True)
        return freed

    def forget_models(self) -> None:
        """Delete every global model and buffer this worker holds of the run (one it held
        turned out corrupt: the next :meth:`resolve` catches up from a checkpoint)."""
        for folder in (self.models, self.buffers):
            shutil.rmtree(folder, ignore_errors=True)

    def release(self) -> int:
        """Delete the whole run directory; return the bytes freed."""
        freed = _tree_bytes(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        return freed


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path``; files that vanish meanwhile count 0 (workers on
    one box share a run directory, and another may be deleting in it)."""
    total = 0
    try:
        for p in path.rglob("*"):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if p.is_file():
                    total += p.stat().st_size
    except FileNotFoundError:
        pass
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # deleted by another worker sharing the directory
        return 0.0


__all__ = [
    "KEEP_MODELS",
    "GlobalModels",
    "HeldGlobal",
    "copy_tree",
    "publish_file",
    "publish_tree",
    "run_dir",
    "verify_local",
]
