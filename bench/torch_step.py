#!/usr/bin/env python3
"""Time one training step (forward + backward + AdamW) of lowband's presets in PyTorch, CPU.

The same model as lowband's engine and shared/reference/diloco_torch.py (GPT-2 style, pre-LayerNorm,
tanh-GELU, learned positions, tied head) with the same AdamW settings. Prints one JSON object with
`ms_per_step`, `tokens_per_s` and `gflops` (same FLOP accounting as `lowband bench engine`).

    python3 bench/torch_step.py --preset ref --threads 2
"""
import argparse, json, time
import os, sys
import torch, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt import GPT

PRESETS = {  # vocab, context, layers, width, heads, batch: as in lowband's config.rs
    'tiny': (256, 32, 2, 32, 2, 4),
    'small': (256, 128, 4, 128, 4, 16),
    'ref': (256, 128, 4, 256, 4, 16),
}

a = argparse.ArgumentParser()
a.add_argument('--preset', default='ref', choices=PRESETS)
a.add_argument('--batch', type=int)
a.add_argument('--steps', type=int, default=20)
a.add_argument('--warmup', type=int, default=3)
a.add_argument('--threads', type=int, default=2)
args = a.parse_args()
torch.set_num_threads(args.threads); torch.manual_seed(0)
V, T, L, C, NH, B = PRESETS[args.preset]
B = args.batch or B


model = GPT(V, T, L, C, NH)
decay = [p for p in model.parameters() if p.dim() >= 2]; rest = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': rest, 'weight_decay': 0.0}],
                        lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
x = torch.randint(V, (B, T)); y = torch.randint(V, (B, T))


def step():
    loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    return loss.item()


for _ in range(args.warmup): step()
times = []
for _ in range(args.steps):
    t0 = time.perf_counter(); loss = step(); times.append(time.perf_counter() - t0)
params = sum(p.numel() for p in model.parameters())
flops_per_token = 6 * (params - T * C) + 12 * L * T * C
ms = sum(times) / len(times) * 1e3
print(json.dumps(dict(engine=f'pytorch {torch.__version__}', preset=args.preset, params=params, batch=B, seq_len=T,
                      threads=args.threads, steps=args.steps, ms_per_step=round(ms, 2),
                      ms_per_step_min=round(min(times) * 1e3, 2), tokens_per_s=round(B * T / ms * 1e3, 1),
                      gflops=round(flops_per_token * B * T / ms / 1e6, 2), final_loss=round(loss, 4))))
