"""Two processes (gloo, CPU) give the same results as one, every field to 1e-9: exact Chan merges of the
moment states, bottom-k merges of the candidate buffers, and processes that saw no data at all.

One ``torch.multiprocessing.spawn`` runs every check (process start-up is the expensive part)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lightning_repsim.metrics import LinearCKA, LLVDistance, LogitDistance, MeanCCA, MeanKLDivergence, SVDDissimilarity
from tests.conftest import REFERENCE_DIR, load_reference
from tests.test_metrics import assert_same, reference_collection, results

pytestmark = pytest.mark.ddp

CASES = ("gauss_k7_m2", "authors_k6_w32_s1s2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checks(rank: int, world: int) -> dict:
    """Everything the test compares; process ``rank`` of ``world`` streams its shard of each case."""
    out = {}
    for case in CASES:
        ref = load_reference(REFERENCE_DIR / f"{case}.npz")
        n = ref["f1"].shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        cut = (2 * n) // 5  # uneven shards: 40% / 60%
        mine = order if world == 1 else (order[:cut] if rank == 0 else order[cut:])
        hashed = reference_collection(ref)  # buffer by content hash
        by_id = LLVDistance(rep_dim=int(ref["rep_dim"]), buffer_size=64)  # buffer by id, smaller than a shard
        pinned = SVDDissimilarity(unemb_p=ref["g1"], unemb_q=ref["g2"], input_sets=ref["candidate_sets"])
        cka, cka_debiased, d_logit = LinearCKA(), LinearCKA(debiased=True), LogitDistance()
        offset = 1e3 * torch.arange(1, ref["f1"].shape[1] + 1, dtype=torch.float64)  # large offsets: re-shifted merges
        for idx in mine.split(50):
            cka.update(ref["f1"][idx] + offset, ref["logits2"][idx])  # unequal widths
            cka_debiased.update(ref["f1"][idx] + offset, ref["logits2"][idx])
            d_logit.update(ref["logits1"][idx], ref["logits2"][idx])
            hashed.update(logits_p=ref["logits1"][idx], logits_q=ref["logits2"][idx], emb_p=ref["f1"][idx], emb_q=ref["f2"][idx])
            by_id.update(ref["logits1"][idx], ref["logits2"][idx], ids=idx)
            pinned.update(ref["f1"][idx], ref["f2"][idx], ids=idx)
        res = results(hashed)
        res["by_id"] = by_id.compute_result()
        res["pinned"] = pinned.compute_result()
        res["cka"], res["cka_debiased"], res["d_logit"] = (m.compute_result() for m in (cka, cka_debiased, d_logit))
        res["local_n_after_sync"] = hashed["llv"].num_inputs  # unsynced again after compute()
        out[case] = res
    # lazily sized metrics where one process sees no data at all
    ref = load_reference(REFERENCE_DIR / f"{CASES[0]}.npz")
    lazy = {"llv": LLVDistance(rep_dim=2), "cca": MeanCCA(), "kl": MeanKLDivergence(), "svd": SVDDissimilarity(),
            "cka": LinearCKA()}
    if rank == 0:
        lazy["cka"].update(ref["f1"], ref["logits2"])
        lazy["llv"].update(ref["logits1"], ref["logits2"])
        lazy["cca"].update(ref["f1"], ref["f2"])
        lazy["kl"].update(ref["logits1"], ref["logits2"])
        lazy["svd"].update(ref["f1"], ref["f2"], unemb_p=ref["g1"], unemb_q=ref["g2"])
    else:
        lazy["svd"].unemb_p, lazy["svd"].unemb_q = ref["g1"], ref["g2"]
    out["empty_rank"] = {name: metric.compute_result() for name, metric in lazy.items()}
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run_checks(rank, world)
        torch.save(result, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path, monkeypatch):
    if "OMP_NUM_THREADS" not in os.environ:  # single-threaded workers; restored after the test (no leak into later ones)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = str(tmp_path / "result")
    # a fork server imports this module once and forks both workers from that clean, single-threaded
    # process: half the start-up of "spawn" and none of the hazards of forking the test process
    mp.set_forkserver_preload([__name__])
    mp.start_processes(_worker, args=(2, _free_port(), path), nprocs=2, join=True, start_method="forkserver")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_checks(0, 1)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        multi = torch.load(f"{path}.{rank}", weights_only=False)
        for case in CASES:
            n = load_reference(REFERENCE_DIR / f"{case}.npz")["f1"].shape[0]
            for name in ("llv", "svd", "kl", "mcca", "by_id", "pinned", "cka", "cka_debiased", "d_logit"):
                assert_same(multi[case][name], single[case][name], path=f"rank {rank} {case} {name}")
            assert multi[case]["llv"].num_inputs == n
            assert multi[case]["local_n_after_sync"] == ((2 * n) // 5 if rank == 0 else n - (2 * n) // 5)
        for name in ("llv", "cca", "kl", "svd", "cka"):
            assert_same(multi["empty_rank"][name], single["empty_rank"][name], path=f"rank {rank} empty_rank {name}")
