"""Several devices of one machine without Ray: one process per device, shards assigned
round-robin from the same deterministic plan. Each process writes whole shards; manifest
updates are serialised with a file lock, so an interrupted run resumes like any other."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import EmbedxError

log = logging.getLogger(__name__)


def assign(shard_indices: list[int], num_devices: int) -> list[list[int]]:
    """Round-robin: shard i of the pending list goes to device i mod n."""
    return [shard_indices[k::num_devices] for k in range(num_devices)]


def run_devices(plan, out: Path, config, devices: list[str]) -> tuple[int, int]:
    import multiprocessing as mp
    from dataclasses import replace

    from . import shards

    shard_of = {r.row_id: r.row_id // config.shard_size for r in plan.pending}
    pending_shards = sorted(set(shard_of.values()))
    groups = assign(pending_shards, len(devices))
    from .backbone import random_state_of, weights_argument

    weights = weights_argument(plan.backbone.weights_source)
    random_state = random_state_of(plan.backbone)
    ctx = mp.get_context("spawn")  # CUDA cannot be shared with forked children
    procs = []
    for device, group in zip(devices, groups):
        if not group:
            continue
        wanted = set(group)
        records = [r for r in plan.pending if shard_of[r.row_id] in wanted]
        child_config = replace(config, device=device, weights=weights, progress=False, overwrite=False)
        cpu_share = sum(1 for d in devices if d == "cpu")
        p = ctx.Process(target=_device_main, name=f"embedx-{device}",
                        args=(records, str(out), child_config, plan.metadata, plan.backbone.weights_sha256, cpu_share,
                              random_state))
        p.start()
        procs.append((device, p))
    failed = []
    try:
        for device, p in procs:
            p.join()
            if p.exitcode != 0:
                failed.append(f"{device} (exit code {p.exitcode})")
    except BaseException:
        for _, p in procs:
            p.terminate()
        raise
    manifest = shards.read_manifest(out)
    plan.manifest.clear()
    plan.manifest.update(manifest)
    if failed:
        raise EmbedxError(f"Extraction failed on {', '.join(failed)}. Completed shards are kept: rerun to resume.")
    embedded = sum(s["rows"] for s in manifest["shards"]) - plan.embedded_before
    errors = sum(len(s["errors"]) for s in manifest["shards"]) - plan.errors_before
    return embedded, errors


def _device_main(records, out: str, config, metadata: dict, expected_sha256: str | None, cpu_share: int = 1,
                 random_state: dict | None = None) -> None:
    """Child process: embed its shards on its device with the local engine."""
    import torch

    from . import shards
    from .backbone import load_matching, usable_cpus

    if config.device == "cpu" and cpu_share > 1:
        # CPU "devices" share the cores this process may use (its affinity mask, as in the
        # engine's defaults): without this each would start one thread per core
        torch.set_num_threads(max(1, usable_cpus() // cpu_share))
    from .extractor import _Plan, _run_local, _StageTimer, configured

    backbone = configured(load_matching(config.model, config.weights, expected_sha256, random_state), config)
    out_path = Path(out)
    plan = _Plan(backbone=backbone, device=config.device if config.device != "auto" else "cpu",
                 precision=metadata["precision"], metadata=metadata, manifest=shards.read_manifest(out_path),
                 records=records, pending=records, skipped=0, embedded_before=0, errors_before=0)
    _run_local(plan, out_path, config, _StageTimer(), shared_manifest=True)
