"""``fleet dataset``: inspect, verify and write microshard datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from fleet.cli.root import (
    FleetGroup,
    _on_root,
    _print_json,
    _print_rows,
    console,
    json_option,
    main,
)


@main.group(cls=FleetGroup)
def dataset() -> None:
    """Inspect, verify and write microshard datasets."""


def _dataset_root(path: Path) -> tuple[Any, str]:
    """The shared root's store and ``path`` relative to it: ``path`` as given if it
    exists from here (it must lie under a local FLEET_SHARED_ROOT), else as a
    shared-root-relative path (local or on an object store)."""
    from fleet.settings import FleetSettings
    from fleet.storage import LocalStore, open_store

    store = open_store(FleetSettings.from_env())
    if isinstance(store, LocalStore) and path.exists():
        return store, store.relative(path.resolve())
    return store, path.as_posix()


@dataset.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--glob", default=None, help="Only shard files matching this (plain directories).")
@click.option("--top", default=10, show_default=True, help="Microshards to list.")
@json_option
def dataset_inspect(path: Path, glob: str | None, top: int, as_json: bool) -> None:
    """A dataset's view id, layout, microshards and bytes (sizes checked). PATH is under
    the shared root (FLEET_SHARED_ROOT), given from here or relative to it."""
    from fleet.data.dataset import read_dataset

    shared, rel = _dataset_root(path)
    index = read_dataset(shared, rel, glob=glob)
    if as_json:
        _print_json(index.model_dump(mode="json"))
        return
    rows = {
        "dataset": index.path,
        "view_id": index.view_id,
        "layout": index.layout,
        "microshards": f"{len(index.microshards):,}",
        "bytes": f"{index.total_bytes:,}",
        "content hashes": "recorded" if index.microshards[0].content_hash else "none",
    }
    _print_rows(rows, width=16)
    table = Table("ordinal", "microshard", "bytes", "file", title=f"first {top} microshards")
    for m in index.microshards[:top]:
        table.add_row(str(m.ordinal), m.microshard_id, f"{m.bytes_len:,}", m.path)
    console.print(table)


@dataset.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--glob", default=None, help="Only shard files matching this (plain directories).")
def dataset_verify(path: Path, glob: str | None) -> None:
    """Check every microshard's size and content hash; exit 1 on the first bad one."""
    from fleet.data.dataset import read_dataset, verify_dataset

    shared, rel = _dataset_root(path)
    index = read_dataset(shared, rel, glob=glob)
    hashed = verify_dataset(shared, index)
    console.print(
        f"[green]ok[/green] {index.path}: {len(index.microshards):,} microshards, "
        f"{index.total_bytes:,} bytes, {hashed:,} content hashes checked",
        soft_wrap=True,
    )


@dataset.command("write")
@click.argument("example", type=click.Choice(["charlm", "digits"]))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--microshards", type=int, default=64, show_default=True)
@click.option(
    "--layout",
    type=click.Choice(["fetch-manifest", "directory"]),
    default="fetch-manifest",
    show_default=True,
    help="burn_p2p's fetch-manifest.json with content hashes, or plain shard files.",
)
def dataset_write(example: str, path: Path, microshards: int, layout: str) -> None:
    """Write an example's training corpus as a microshard dataset at PATH (relative to
    the shared root, FLEET_SHARED_ROOT, unless absolute): then `fleet diloco --dataset
    PATH` trains on it."""
    import importlib

    from fleet.settings import FleetSettings
    from fleet.storage import LocalStore, open_store

    module = importlib.import_module(f"fleet.examples.{example}")
    manifest = layout == "fetch-manifest"
    settings = FleetSettings.from_env()
    store = open_store(settings)
    if path.is_absolute() or isinstance(store, LocalStore):
        target = str(path if path.is_absolute() else Path(settings.shared_root) / path)
        index = module.write_dataset(Path(target), microshards, manifest=manifest)
    else:  # written locally, then uploaded shard by shard, its fetch manifest last
        rel = store.relative(path.as_posix())
        with store.output(rel) as staged:
            index = module.write_dataset(staged, microshards, manifest=manifest)
        target = _on_root(settings, rel)
    console.print(
        f"[green]wrote[/green] {target}: {index['microshards']:,} microshards, "
        f"{index['bytes']:,} bytes ({layout})",
        soft_wrap=True,
    )
