#!/usr/bin/env python3
"""Side-by-side training-step benchmark: lowband's engine vs PyTorch, same model, same threads.

Runs `lowband bench engine --json -` and `bench/torch_step.py` alternately (`--rounds` times each,
so slow phases of a shared machine hit both), then prints a markdown table with the ratio
lowband / PyTorch of mean ms per step (below 1.0: lowband is faster).

    python3 bench/engine_vs_torch.py --presets ref,small,tiny --rounds 3
Needs torch in this Python; builds nothing: run `cargo build --release` first.
"""
import argparse, json, os, statistics, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
a = argparse.ArgumentParser()
a.add_argument('--presets', default='ref,small,tiny')
a.add_argument('--rounds', type=int, default=3)
a.add_argument('--threads', type=int, default=2)
a.add_argument('--lowband', default=os.path.join(here, '..', 'target', 'release', 'lowband'))
args = a.parse_args()
steps = {'ref': 20, 'small': 30, 'tiny': 200}


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


rows = []
for preset in args.presets.split(','):
    n = str(steps.get(preset, 20))
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run([args.lowband, '--threads', str(args.threads), 'bench', 'engine', '--preset', preset, '--steps', n, '--json', '-']))
        theirs.append(run([sys.executable, os.path.join(here, 'torch_step.py'), '--preset', preset, '--steps', n, '--threads', str(args.threads)]))
    o_ms = statistics.mean(r['ms_per_step'] for r in ours); t_ms = statistics.mean(r['ms_per_step'] for r in theirs)
    rows.append((preset, ours[0]['params'], ours[0]['batch'], o_ms, min(r['ms_per_step_min'] for r in ours), t_ms,
                 min(r['ms_per_step_min'] for r in theirs), o_ms / t_ms, statistics.mean(r['gflops'] for r in ours),
                 statistics.mean(r['peak_fraction'] or 0 for r in ours), max(r['peak_rss_mib'] or 0 for r in ours),
                 statistics.mean(r['allocations_per_step'] for r in ours), theirs[0]['engine']))

print(f'| preset | params | batch | lowband ms/step (min) | {rows[0][-1]} ms/step (min) | ratio | lowband GFLOP/s | of fp32 peak | peak RSS MiB | allocations/step |')
print('|---|---|---|---|---|---|---|---|---|---|')
for r in rows:
    print(f'| {r[0]} | {r[1]:,} | {r[2]} | {r[3]:.1f} ({r[4]:.1f}) | {r[5]:.1f} ({r[6]:.1f}) | **{r[7]:.2f}** | {r[8]:.1f} | {r[9]:.0%} | {r[10]:.0f} | {r[11]:.0f} |')
