"""lowband's Muon against PyTorch's (`torch.optim.Muon`, with AdamW for the other tensors) on
identical parameters and gradients: run by `crates/lowband-engine/tests/torch_reference.rs`.

The case directory holds `case.json` (the tensors' names and shapes, the optimizer settings, the
learning rate of each step) and `case.safetensors` (`initial.NAME`, `grad.S.NAME` and
`after.S.NAME` for each step S). Two comparisons:
- against torch.optim.Muon with its Newton-Schulz iteration in float32 (lowband's arithmetic):
  every parameter within 1e-5 relative (max |diff| / max |value| per tensor);
- against torch.optim.Muon as shipped (bfloat16 Newton-Schulz): within 2e-2.
Exit status 1 when a bound is broken.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.optim import _muon


def ns_float32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz without its cast to bfloat16."""
    a, b, c = ns_coefficients
    x = grad.to(dtype=torch.float32, copy=True)
    if grad.size(0) > grad.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x


def run(case, tensors, float32):
    torch.manual_seed(0)
    names = [t["name"] for t in case["tensors"]]
    params = {n: torch.nn.Parameter(tensors[f"initial.{n}"].clone()) for n in names}
    muon_names = [t["name"] for t in case["tensors"] if t["muon"]]
    decayed = [t["name"] for t in case["tensors"] if not t["muon"] and t["decay"]]
    plain = [t["name"] for t in case["tensors"] if not t["muon"] and not t["decay"]]
    o = case["optimizer"]
    m = o["muon"]
    muon = torch.optim.Muon(
        [params[n] for n in muon_names], lr=m["lr"], weight_decay=o["weight_decay"],
        momentum=m["momentum"], nesterov=True, ns_steps=m["ns_steps"],
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [params[n] for n in decayed], "weight_decay": o["weight_decay"]},
            {"params": [params[n] for n in plain], "weight_decay": 0.0},
        ],
        lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
    )
    original = _muon._zeropower_via_newtonschulz
    if float32:
        _muon._zeropower_via_newtonschulz = ns_float32
    worst = 0.0
    try:
        for step, lr in enumerate(case["learning_rates"]):
            for group in muon.param_groups:
                group["lr"] = m["lr"] * lr / o["lr"]
            for group in adamw.param_groups:
                group["lr"] = lr
            for n in names:
                params[n].grad = tensors[f"grad.{step}.{n}"].clone()
            muon.step()
            adamw.step()
            for n in names:
                ours = tensors[f"after.{step}.{n}"]
                theirs = params[n].detach()
                scale = theirs.abs().max().item() or 1.0
                diff = (ours - theirs).abs().max().item() / scale
                worst = max(worst, diff)
    finally:
        _muon._zeropower_via_newtonschulz = original
    return worst


def main():
    directory = Path(sys.argv[1])
    case = json.loads((directory / "case.json").read_text())
    tensors = load_file(directory / "case.safetensors")
    exact = run(case, tensors, float32=True)
    shipped = run(case, tensors, float32=False)
    print(f"Muon vs torch.optim.Muon, float32 Newton-Schulz: max relative difference {exact:.2e} (bound 1e-5)")
    print(f"Muon vs torch.optim.Muon as shipped (bfloat16 Newton-Schulz): {shipped:.2e} (bound 2e-2)")
    sys.exit(0 if exact <= 1e-5 and shipped <= 2e-2 else 1)


if __name__ == "__main__":
    main()
