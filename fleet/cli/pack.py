"""``fleet pack``: inspect, verify and convert parameter packs."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from fleet.cli.root import FleetGroup, _print_json, _print_rows, console, json_option, main


@main.group(cls=FleetGroup)
def pack() -> None:
    """Inspect, verify and convert parameter packs (format v1)."""


def _local_path(path: Path) -> Path:
    """``path`` as given if it exists from here, else under the shared root
    (``FLEET_SHARED_ROOT``), so the shared-root-relative paths jobs print work as they are."""
    if path.exists() or path.is_absolute():
        return path
    from fleet.settings import FleetSettings

    settings = FleetSettings.from_env()
    if settings.shared_root_is_url:
        return path
    under_root = Path(settings.shared_root) / path
    return under_root if under_root.exists() else path


@pack.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--top", default=10, show_default=True, help="Largest tensors to list.")
@json_option
def pack_inspect(path: Path, top: int, as_json: bool) -> None:
    """Show a pack's format, counts, layout hash and largest tensors. PATH may be
    relative to the shared root, as jobs print it."""
    from fleet.codec import read_manifest

    path = _local_path(path)
    manifest = read_manifest(path)
    if as_json:
        _print_json({"pack": str(path), **manifest.model_dump(mode="json")})
        return
    rows = {
        "pack": str(path),
        "format": manifest.format,
        "model_schema_hash": manifest.model_schema_hash,
        "layout_hash": manifest.layout_hash,
        "parameter_count": f"{manifest.parameter_count:,} ({manifest.values_nbytes:,} bytes)",
        "values_digest": manifest.values_digest or "-",
    }
    for name in ("included_keys", "excluded_float_keys", "ignored_non_float_keys"):
        keys = getattr(manifest, name)
        rows[name] = "-" if keys is None else str(len(keys))
    _print_rows(rows)
    entries = manifest.layout_entries()
    table = Table("tensor", "shape", "dtype", "numel", title=f"top {top} tensors by size")
    if entries is not None:
        for e in sorted(entries, key=lambda e: -e.numel)[:top]:
            table.add_row(e.name, str(list(e.shape)), e.dtype, f"{e.numel:,}")
    else:
        for key in (manifest.included_keys or [])[:top]:
            table.add_row(key, "?", "?", "?")
    console.print(table)


@pack.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def pack_verify(path: Path) -> None:
    """Check a pack: manifest, byte length, content digest, finite values. Exit 1 if bad.
    PATH may be relative to the shared root."""
    from fleet.codec import read_pack

    path = _local_path(path)
    manifest, _ = read_pack(path, verify=True, check_finite=True)
    digest = "digest ok" if manifest.values_digest else "no digest recorded"
    console.print(
        f"[green]ok[/green] {path}: {manifest.parameter_count:,} values, {digest}, all finite",
        soft_wrap=True,
    )


@pack.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--model-schema-hash", default=None, help="Schema id for a new pack.")
def pack_convert(src: Path, dst: Path, model_schema_hash: str | None) -> None:
    """Convert a pack to a .safetensors file, or a .safetensors file to a pack. SRC may
    be relative to the shared root."""
    from fleet.codec import from_safetensors, to_safetensors

    src = _local_path(src)
    if src.is_dir():
        manifest = to_safetensors(src, dst)
    else:
        manifest = from_safetensors(src, dst, model_schema_hash)
    console.print(
        f"[green]wrote[/green] {dst} ({manifest.parameter_count:,} values)", soft_wrap=True
    )
