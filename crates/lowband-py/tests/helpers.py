"""What the package's tests share: a small torch model, seeded batches, a site's training loop
through lowband.torch.DiLoCo, and DiLoCo written in plain PyTorch (the reference the package
must equal with the fp32 codec)."""

import os
import time
import unittest

import torch
import torch.nn.functional as F

import lowband
import lowband.torch as lt

LR = 1e-2


def binary():
    """The lowband binary the tests run (LOWBAND_BIN, as .ci/run sets it)."""
    try:
        return lowband.find_binary()
    except FileNotFoundError as e:  # pragma: no cover - CI always sets it
        raise unittest.SkipTest(str(e))


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return model.to(dtype)


def batches(site, count, size=16):
    generator = torch.Generator().manual_seed(100 + site)
    return [
        (torch.randn(size, 8, generator=generator), torch.randn(size, 4, generator=generator))
        for _ in range(count)
    ]


def flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def train_site(model, site, data, step_seconds=0.0):
    """A site's whole run through lowband.torch.DiLoCo; its final parameters."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with lt.DiLoCo(model, optimizer, site) as diloco:
        step = 0
        while not diloco.finished:
            x, y = data[step % len(data)]
            step += 1
            loss = F.mse_loss(model(x.to(next(model.parameters()).dtype)), y.to(next(model.parameters()).dtype))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step_seconds:
                time.sleep(step_seconds)
            diloco.step(loss)
    return flat(model)


def plain_diloco(sites, inner_steps, steps, lr_outer=0.7, momentum=0.9):
    """DiLoCo in plain PyTorch on the same batches: the global parameters after the run."""
    theta = [p.detach().clone() for p in tiny_model().parameters()]
    buffer = [torch.zeros_like(p) for p in theta]
    models = [tiny_model() for _ in range(sites)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in models]
    data = [batches(k, steps) for k in range(sites)]
    for start in range(0, steps, inner_steps):
        deltas = []
        for k in range(sites):
            with torch.no_grad():
                for p, t in zip(models[k].parameters(), theta):
                    p.copy_(t)
            for step in range(start, min(start + inner_steps, steps)):
                x, y = data[k][step]
                F.mse_loss(models[k](x), y).backward()
                optimizers[k].step()
                optimizers[k].zero_grad()
            deltas.append([t - p.detach() for p, t in zip(models[k].parameters(), theta)])
        for i in range(len(theta)):
            delta = sum(d[i] for d in deltas) / sites
            buffer[i] = momentum * buffer[i] + delta
            theta[i] = theta[i] - lr_outer * (delta + momentum * buffer[i])
    return torch.cat([t.reshape(-1) for t in theta])


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def ddp_rank(rank, world, init_file, cluster_file, key, address, steps, out_dir):
    """One rank of a torchrun-style site (gloo on CPU): DDP inside the site, rank 0 talks to
    the coordinator. Each rank trains on half of the site's batch; writes its final parameters."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(tiny_model())
    site = lt.connect(model, cluster_file, key, address) if rank == 0 else None
    data = [(x[rank::world], y[rank::world]) for x, y in batches(0, steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with lt.DiLoCo(model, optimizer, site) as diloco:
        step = 0
        while not diloco.finished:
            x, y = data[step]
            step += 1
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            diloco.step()
    torch.save(flat(model.module), os.path.join(out_dir, f"rank-{rank}.pt"))
    # Every rank done before the group goes (one rank tearing gloo down while another still
    # talks aborts the process).
    dist.barrier()
    dist.destroy_process_group()
