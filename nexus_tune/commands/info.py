"""`nexus-tune info`: the GPU, its SM split granularity, the splits it allows, the backend, versions."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from nexus_tune.core.device import DeviceInfo, identify, software_versions
from nexus_tune.core.partition import GREEN_CONTEXTS, SplitTable


def _device_table(dev: DeviceInfo) -> Table:
    t = Table(title="GPU", show_header=False)
    for key, value in [
        ("name", dev.name), ("slug", dev.slug), ("index", dev.index), ("SMs", dev.sm_count),
        ("memory", f"{dev.memory_gib:.1f} GiB"),
        ("compute capability", ".".join(map(str, dev.compute_capability))),
        ("driver", dev.driver_version), ("CUDA (driver)", dev.cuda_version),
    ]:
        t.add_row(key, str(value))
    return t


def _partition_table(table: SplitTable) -> Table:
    t = Table(title="SM partitions", show_header=False)
    t.add_row("backend", table.backend)
    if table.fallback_reason:
        t.add_row("why", table.fallback_reason)
    g = table.granularity
    if g:
        source = "read off the device" if g.from_device else "ASSUMED: the driver does not report them"
        t.add_row("granularity", f"min partition {g.min_partition} SMs, alignment {g.alignment} ({source})")
        memory = "n/a" if table.memory_bytes is None else f"{table.memory_bytes / 2**20:.0f} MiB"
        t.add_row("table creation", f"{len(table)} splits in {table.creation_s * 1e3:.0f} ms, device memory {memory}")
    return t


def _splits_table(table: SplitTable) -> Table:
    t = Table(title="splits (prefill | decode)")
    t.add_column("prefill SMs", justify="right")
    t.add_column("decode SMs", justify="right")
    for split in table:
        t.add_row(str(split.prefill_sms), str(split.decode_sms))
    return t


def _versions_table(versions: dict[str, str | None]) -> Table:
    t = Table(title="software", show_header=False)
    for key, value in versions.items():
        t.add_row(key, value or "-")
    return t


def run_info(args: argparse.Namespace) -> int:
    console = Console()
    try:
        dev = identify(args.device)
    except ValueError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 2
    if dev:
        console.print(_device_table(dev))
    else:
        console.print(f"[bold red]no NVIDIA GPU:[/] {dev.reason}", soft_wrap=True)
    # info reports the fallback in its own table, so the table does not warn on its own.
    with SplitTable(args.device if dev else 0, warn=False) as table:
        console.print(_partition_table(table))
        if table.backend == GREEN_CONTEXTS:
            console.print(_splits_table(table))
    console.print(_versions_table(software_versions()))
    return 0
