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


def plain_streaming(sites, inner_steps, steps, fragments, overlap, mix, lr_outer=0.7, momentum=0.9):
    """Streaming DiLoCo in plain PyTorch on the same batches (Douillard et al., arXiv 2501.18512,
    as lowband schedules it): fragment r mod P of the flat parameters syncs after step
    min(max(floor((r + 1)H/P), r + 1), T) while that is before T; its merge is mixed into every
    site `overlap` steps later (local = mix * local + (1 - mix) * global) or before the next sync;
    then every fragment once more at T. The global parameters after the run."""
    n = flat(tiny_model()).numel()
    ranges = [(i * n // fragments, (i + 1) * n // fragments) for i in range(fragments)]

    def end_step(r):
        return min(max((r + 1) * inner_steps // fragments, r + 1), steps)

    syncs = next(r for r in range(steps + 1) if end_step(r) >= steps)
    theta = flat(tiny_model())
    buffer = torch.zeros(n)
    models = [tiny_model() for _ in range(sites)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in models]
    held = [theta.clone() for _ in range(sites)]  # what each site holds of the global parameters
    data = [batches(k, steps) for k in range(sites)]

    def local(k):
        return torch.nn.utils.parameters_to_vector(models[k].parameters()).detach()

    def merge(r):
        a, b = ranges[r % fragments]
        delta = sum(held[k][a:b] - local(k)[a:b] for k in range(sites)) / sites
        buffer[a:b] = momentum * buffer[a:b] + delta
        theta[a:b] = theta[a:b] - lr_outer * (delta + momentum * buffer[a:b])

    def mix_in(r, weight):
        a, b = ranges[r % fragments]
        for k in range(sites):
            held[k][a:b] = theta[a:b]
            mixed = local(k)
            mixed[a:b] = weight * mixed[a:b] + (1 - weight) * theta[a:b]
            torch.nn.utils.vector_to_parameters(mixed, models[k].parameters())

    round, in_flight = 0, None  # (round, the step it is mixed in at)
    for step in range(steps):
        if in_flight is not None and in_flight[1] <= step:
            mix_in(in_flight[0], mix)
            in_flight = None
        for k in range(sites):
            x, y = data[k][step]
            F.mse_loss(models[k](x), y).backward()
            optimizers[k].step()
            optimizers[k].zero_grad()
        if step + 1 == end_step(round) and step + 1 < steps:
            if in_flight is not None:
                mix_in(in_flight[0], mix)
            merge(round)
            in_flight = (round, step + 1 + overlap)
            round += 1
    if in_flight is not None:
        mix_in(in_flight[0], mix)
    for r in range(syncs, syncs + fragments):
        merge(r)
        mix_in(r, 0.0)
    return theta


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_ddp_site(cluster, directory, steps):
    """Site 0 as a torchrun-style site of 2 gloo ranks (processes), site 1 in this process; the
    final parameters of rank 0, rank 1 and site 1. Raises if a rank fails."""
    import torch.multiprocessing as mp

    init_file = os.path.join(directory, "gloo-init")
    out = os.path.join(directory, "ranks")
    os.makedirs(out)
    context = mp.get_context("spawn")
    ranks = [
        context.Process(
            target=ddp_rank,
            args=(rank, 2, init_file, str(cluster.cluster_file), str(cluster.site_keys[0]),
                  cluster.address, steps, out),
        )
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    other = train_site(tiny_model(), cluster.site(1), batches(1, steps))
    for process in ranks:
        process.join(timeout=120)
        if process.exitcode != 0:
            raise AssertionError(f"a rank failed (exit code {process.exitcode})")
    rank0 = torch.load(os.path.join(out, "rank-0.pt"))
    rank1 = torch.load(os.path.join(out, "rank-1.pt"))
    return rank0, rank1, other


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
