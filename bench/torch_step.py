#!/usr/bin/env python3
"""Time one training step (forward + backward + AdamW) of lowband's presets in PyTorch, CPU.

The same model as lowband's engine and shared/reference/diloco_torch.py (GPT-2 style, pre-LayerNorm,
tanh-GELU, learned positions, tied head) with the same AdamW settings. Prints one JSON object with
`ms_per_step`, `tokens_per_s` and `gflops` (same FLOP accounting as `lowband bench engine`).

    python3 bench/torch_step.py --preset ref --threads 2
"""
import argparse, json, time
import torch, torch.nn as nn, torch.nn.functional as F

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


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.ln_1, s.c_attn, s.attn_proj = nn.LayerNorm(C), nn.Linear(C, 3 * C), nn.Linear(C, C)
        s.ln_2, s.c_fc, s.mlp_proj = nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(c, 2)
        q, k, v = [z.view(b, t, NH, c // NH).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + s.attn_proj(y)
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x)), approximate='tanh'))


class GPT(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte, s.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        s.h = nn.ModuleList([Block() for _ in range(L)]); s.ln_f = nn.LayerNorm(C)
        for m in s.modules():  # the init lowband and the reference use
            if isinstance(m, (nn.Linear, nn.Embedding)): nn.init.normal_(m.weight, 0, 0.02)
            if isinstance(m, nn.Linear): nn.init.zeros_(m.bias)

    def forward(s, idx, targets):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1]))
        for blk in s.h: x = blk(x)
        logits = s.ln_f(x) @ s.wte.weight.T
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


model = GPT()
decay = [p for p in model.parameters() if p.dim() >= 2]; rest = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': rest, 'weight_decay': 0.0}],
                        lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
x = torch.randint(V, (B, T)); y = torch.randint(V, (B, T))


def step():
    loss = model(x, y); loss.backward()
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
