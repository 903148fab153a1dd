#!/usr/bin/env python3
"""lowband vs the independent PyTorch reference (shared/reference/diloco_torch.py), same protocol.

For each seed, runs the reference's `ddp` and `diloco` and `lowband compare --config
configs/reference.toml` on the same corpus, then prints a markdown table of final validation
losses and their relative differences. Exits 1 if any differs by more than --tolerance (2%).
Sampling differs between the two, so agreement is statistical, not bitwise.

    python3 bench/reference_agreement.py --corpus kjv.txt --seeds 0,1
--steps and --H go to both implementations (e.g. --steps 100 for a quick check of the script).
"""
import argparse, json, os, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
a = argparse.ArgumentParser()
a.add_argument('--corpus', required=True)
a.add_argument('--seeds', default='0,1')
a.add_argument('--steps', type=int, default=1000)
a.add_argument('--H', type=int, default=50)
a.add_argument('--tolerance', type=float, default=0.02)
a.add_argument('--reference', default=os.path.join(root, '..', 'shared', 'reference', 'diloco_torch.py'))
a.add_argument('--lowband', default=os.path.join(root, 'target', 'release', 'lowband'))
args = a.parse_args()

rows, worst = [], 0.0
for seed in [int(s) for s in args.seeds.split(',')]:
    ref = {}
    for strategy in ['ddp', 'diloco']:
        out = subprocess.run([sys.executable, args.reference, '--corpus', args.corpus, '--strategy', strategy,
                              '--H', str(args.H), '--steps', str(args.steps), '--seed', str(seed)],
                             check=True, capture_output=True, text=True).stdout
        ref[strategy] = json.loads(out.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        summary = os.path.join(tmp, 'summary.json')
        subprocess.run([args.lowband, 'compare', '--config', os.path.join(root, 'configs', 'reference.toml'), '--corpus', args.corpus,
                        '--strategies', f'ddp,diloco@{args.H}', '--steps', str(args.steps), '--seed', str(seed),
                        '--runs-dir', tmp, '--json', summary], check=True, capture_output=True)
        ours = {s['strategy'].split('@')[0]: s for s in json.load(open(summary))['strategies']}
    for strategy in ['ddp', 'diloco']:
        r, o = ref[strategy]['final_val_loss'], ours[strategy]['final_val_loss']
        diff = o / r - 1
        worst = max(worst, abs(diff))
        rows.append((seed, strategy, r, o, diff, ref[strategy]['inter_site_bytes'], ours[strategy]['inter_site_bytes']))

print('| seed | strategy | reference val loss | lowband val loss | difference | reference bytes | lowband bytes |')
print('|---|---|---|---|---|---|---|')
for seed, strategy, r, o, diff, rb, ob in rows:
    print(f'| {seed} | {strategy} | {r:.4f} | {o:.4f} | {diff:+.2%} | {int(rb):,} | {int(ob):,} |')
print(f'\nlargest difference {worst:.2%} (tolerance {args.tolerance:.0%})')
sys.exit(0 if worst <= args.tolerance else 1)
