#!/usr/bin/env python3
"""lowband's own time per round on a PyTorch site, for flat float32 buffers of N parameters:
copy out (model -> the float32 master buffer), encode and send (the pseudo-gradient through the
codec and error feedback, signed, handed to QUIC), wait for the merge and receive it (the
coordinator's decode, aggregate and outer step, its broadcast, the site's decode into the
buffer), copy in. One site and the `lowband coordinator` child on this machine, loopback QUIC.

    python3 bench/torch_overhead.py --params 100000000,250000000 --strategies diloco,sparseloco

Prints a markdown table (median of rounds 1..R; round 0 carries the initial parameters in
full) and the fp32 round's loopback throughput (8N bytes there and back in the wait: a lower
bound, since that time includes the coordinator's merge)."""
import argparse
import json
import statistics
import tempfile
import threading
import time

import torch

import lowband

a = argparse.ArgumentParser()
a.add_argument("--params", default="100000000,250000000")
a.add_argument("--strategies", default="diloco,sparseloco")
a.add_argument("--rounds", type=int, default=4)
a.add_argument("--binary", default=None)
args = a.parse_args()


def measure(params, strategy):
    model = torch.randn(params) * 0.02  # stands for the model's parameters (CPU float32)
    master = torch.empty(params)
    change = torch.randn(params) * 1e-3  # what training would change
    with tempfile.TemporaryDirectory() as directory:
        cluster = lowband.LocalCluster(
            directory, sites=1, strategy=f"{strategy}@1", initial=model, binary=args.binary,
            overrides={"steps": args.rounds, "network": {"round_deadline_ms": 3_600_000}},
        )
        try:
            site = cluster.site(0)
            rounds = []
            round = site.next_round(master)
            model.copy_(master)
            while round is not None and round < site.rounds:
                model.add_(change)  # "training" (not timed)
                t0 = time.perf_counter()
                master.copy_(model)
                t1 = time.perf_counter()
                site.send_update(round, master)
                t2 = time.perf_counter()
                round = site.next_round(master)
                t3 = time.perf_counter()
                model.copy_(master)
                t4 = time.perf_counter()
                rounds.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
            site.leave()
            cluster.wait(timeout=600)
            marks = [json.loads(line)["inter_site_bytes"] for line in open(cluster.run_dir / "metrics.jsonl")
                     if '"kind":"round"' in line]
            per_round = statistics.median(b - a for a, b in zip(marks, marks[1:])) if len(marks) > 1 else float("nan")
        finally:
            cluster.kill()
    measured = rounds[1:] or rounds
    columns = [statistics.median(r[i] for r in measured) for i in range(4)]
    return columns, per_round


print("| params | strategy | copy out s | encode + send s | wait + receive + decode s | copy in s | round s | bytes per round (up + down) |")
print("|---|---|---|---|---|---|---|---|")
throughput = []
for params in [int(p) for p in args.params.split(",")]:
    for strategy in args.strategies.split(","):
        (out, send, wait, copy_in), per_round = measure(params, strategy)
        total = out + send + wait + copy_in
        print(f"| {params:,} | {strategy} | {out:.3f} | {send:.3f} | {wait:.3f} | {copy_in:.3f} | {total:.3f} | {per_round:,.0f} |", flush=True)
        if strategy == "diloco":
            throughput.append((params, 8 * params * 8 / (send + wait) / 1e9))
for params, gbits in throughput:
    print(f"\nfp32 at {params:,} parameters: {8 * params / 1e6:,.0f} MB there and back in {8 * params * 8 / gbits / 1e9:.2f} s: at least {gbits:.2f} Gbit/s over loopback QUIC (encode, merge and decode included)")
