#!/usr/bin/env python3
"""The PyTorch example (examples/torch/train_gpt2.py: transformers GPT-2 sites through the lowband
package and coordinator) against the independent reference (shared/reference/diloco_torch.py)
and `lowband compare`, same protocol (configs/reference.toml), DiLoCo, per seed.

    python3 bench/torch_agreement.py --corpus kjv.txt --seeds 0,1

Prints a markdown table of final validation losses and the relative differences; exits 1 if the
example differs from either by more than --tolerance (2%). Sampling differs between the three, so
agreement is statistical, not bitwise. --steps and --H go to all three (e.g. --steps 100 for a
quick check; CI runs a short version through the package's tests). --strategy runs another
strategy (e.g. streaming@50) in the example and in compare; the reference implements only
DiLoCo, so its column is then empty:

    python3 bench/torch_agreement.py --corpus kjv.txt --seeds 0 --strategy streaming@50"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
a = argparse.ArgumentParser()
a.add_argument("--corpus", required=True)
a.add_argument("--seeds", default="0,1")
a.add_argument("--steps", type=int, default=1000)
a.add_argument("--H", type=int, default=50)
a.add_argument("--strategy", default=None, help="default diloco@H (the reference's); any lowband strategy")
a.add_argument("--sites", type=int, default=4)
a.add_argument("--tolerance", type=float, default=0.02)
a.add_argument("--reference", default=os.path.join(root, "..", "shared", "reference", "diloco_torch.py"))
a.add_argument("--lowband", default=os.environ.get("LOWBAND_BIN", os.path.join(root, "target", "release", "lowband")))
args = a.parse_args()
config = os.path.join(root, "configs", "reference.toml")
environment = dict(os.environ, LOWBAND_BIN=args.lowband)
strategy = args.strategy or f"diloco@{args.H}"
with_reference = strategy == f"diloco@{args.H}"

rows, worst = [], 0.0
for seed in [int(s) for s in args.seeds.split(",")]:
    reference = {"final_val_loss": None}
    if with_reference:
        reference = json.loads(subprocess.run(
            [sys.executable, args.reference, "--corpus", args.corpus, "--strategy", "diloco", "--K", str(args.sites),
             "--H", str(args.H), "--steps", str(args.steps), "--seed", str(seed)],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "example.json")
        subprocess.run([sys.executable, os.path.join(root, "examples", "torch", "train_gpt2.py"), "--corpus", args.corpus,
                        "--sites", str(args.sites), "--strategy", strategy, "--steps", str(args.steps),
                        "--seed", str(seed), "--config", config, "--json", out, "--directory", os.path.join(tmp, "run")],
                       check=True, capture_output=True, env=environment)
        example = json.load(open(out))
        summary = os.path.join(tmp, "summary.json")
        subprocess.run([args.lowband, "compare", "--config", config, "--corpus", args.corpus, "--sites", str(args.sites),
                        "--strategies", strategy, "--steps", str(args.steps), "--seed", str(seed),
                        "--runs-dir", tmp, "--json", summary], check=True, capture_output=True)
        compare = json.load(open(summary))["strategies"][0]
    e, r, c = example["final_val_loss"], reference["final_val_loss"], compare["final_val_loss"]
    worst = max(worst, abs(e / r - 1) if r else 0.0, abs(e / c - 1))
    rows.append((seed, e, r, c, example["inter_site_bytes"], compare["inter_site_bytes"], example["wall_seconds"]))

print(f"{strategy}, K = {args.sites}, {args.steps} steps\n")
print("| seed | example (transformers + lowband.torch) | reference (diloco_torch.py) | lowband compare | example vs reference | example vs compare | example bytes | compare bytes | example wall s |")
print("|---|---|---|---|---|---|---|---|---|")
for seed, e, r, c, eb, cb, wall in rows:
    reference_cells = f"{r:.4f} | {e / r - 1:+.2%}" if r else "- | -"
    r_loss, r_diff = reference_cells.split(" | ")
    print(f"| {seed} | {e:.4f} | {r_loss} | {c:.4f} | {r_diff} | {e / c - 1:+.2%} | {eb:,} | {cb:,} | {wall} |")
print(f"\nlargest difference {worst:.2%} (tolerance {args.tolerance:.0%})")
sys.exit(1 if worst > args.tolerance else 0)
