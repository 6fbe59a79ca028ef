"""``fleet gc``: delete what nothing needs on the shared root."""

from __future__ import annotations

import click

from fleet.cli.root import _settings, console, main


@main.command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option(
    "--min-age-s",
    type=float,
    default=3600.0,
    show_default=True,
    help="Only touch entries older than this (in-flight work is younger).",
)
def gc_cmd(dry_run: bool, min_age_s: float) -> None:
    """Delete what nothing needs on the shared root: stray packs of runs, unreferenced
    tmp/exchange packs, stale temp files (runs of jobs Redis does not know are kept)."""
    from fleet.gc import collect
    from fleet.jobs import JobStore
    from fleet.storage import open_store

    settings = _settings()
    store = open_store(settings)
    found = collect(store, JobStore.from_settings(settings), min_age_s=min_age_s, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for rel, size in found.delete:
        console.print(f"{verb} {rel} ({size:,} bytes)", highlight=False, soft_wrap=True)
    for run_dir in found.unknown_runs:
        console.print(f"kept {run_dir.rsplit('/', 1)[-1]}: no such job in Redis", highlight=False)
    if found.aborted_uploads:
        aborted = "would abort" if dry_run else "aborted"
        console.print(f"{aborted} {found.aborted_uploads} unfinished uploads", highlight=False)
    total = sum(size for _, size in found.delete)
    console.print(f"{len(found.delete)} entries, {total:,} bytes {verb}", highlight=False)
