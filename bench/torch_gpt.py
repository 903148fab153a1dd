"""The GPT of lowband's engine in plain PyTorch, shared by the bench scripts: GPT-2 style,
pre-LayerNorm, causal attention, tanh-GELU MLP 4x, learned positions, tied head; init N(0, 0.02)
with zero biases (as lowband and shared/reference/diloco_torch.py). Module names follow the
reference: c_attn, attn_proj, c_fc, mlp_proj."""
import torch, torch.nn as nn, torch.nn.functional as F


class Block(nn.Module):
    def __init__(s, C, NH):
        super().__init__(); s.NH = NH
        s.ln_1, s.c_attn, s.attn_proj = nn.LayerNorm(C), nn.Linear(C, 3 * C), nn.Linear(C, C)
        s.ln_2, s.c_fc, s.mlp_proj = nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(c, 2)
        q, k, v = [z.view(b, t, s.NH, c // s.NH).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + s.attn_proj(y)
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x)), approximate='tanh'))


class GPT(nn.Module):
    def __init__(s, V, T, L, C, NH):
        super().__init__()
        s.wte, s.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        s.h = nn.ModuleList([Block(C, NH) for _ in range(L)]); s.ln_f = nn.LayerNorm(C)
        for m in s.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)): nn.init.normal_(m.weight, 0, 0.02)
            if isinstance(m, nn.Linear): nn.init.zeros_(m.bias)

    def forward(s, idx):
        """Logits (B, T, V)."""
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1]))
        for blk in s.h: x = blk(x)
        return s.ln_f(x) @ s.wte.weight.T
