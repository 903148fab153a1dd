"""lowband for a PyTorch training loop: `DiLoCo` wraps your model and inner optimizer; every H
inner steps it hands the trained parameters to the site (lowband's Rust core computes the
pseudo-gradient against the round's start, compresses it with error feedback, signs and sends
it), waits for the coordinator's merged global parameters and writes them back into the model.

    site = lowband.torch.connect(model, "cluster.toml", "site-0.key", "10.0.0.1:7700")
    with lowband.torch.DiLoCo(model, optimizer, site) as diloco:
        while not diloco.finished:
            loss = model(batch()).loss
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            diloco.step(loss)

Inside a torchrun site (DDP over gloo or NCCL), only rank 0 holds a `Site`; pass `site=None`
on the other ranks: they receive the merged parameters by `torch.distributed` broadcast from
rank 0. FSDP-sharded models are refused (a site's parameters must be whole on rank 0).
Parameters in bf16 or fp16 are synced through a float32 master copy (the coordinator's θ stays
float32; the model gets it rounded to its own dtype)."""

import time

import torch
import torch.distributed as dist

from ._site import Site


def parameters(model):
    """The model's parameters in the flat buffer's order (each once, tied weights once)."""
    module = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    _refuse_sharded(model)
    seen, ordered = set(), []
    for name, parameter in module.named_parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            ordered.append((name, parameter))
    return ordered


def _refuse_sharded(model):
    kinds = {type(m).__name__ for m in model.modules()}
    if "FullyShardedDataParallel" in kinds or "FSDPModule" in kinds or any(
        type(p).__name__ == "DTensor" for p in model.parameters()
    ):
        raise ValueError(
            "FSDP-sharded models are not supported by lowband.torch yet: a site's parameters must "
            "be whole on rank 0 (use DDP inside the site, or gather a full state dict yourself "
            "and use lowband.Site)"
        )


def describe(model):
    """(flat float32 CPU copy of the parameters, [(name, shape)]): what a cluster file and the
    initial parameters of this model are made from."""
    named = parameters(model)
    for name, p in named:
        if not p.dtype.is_floating_point:
            raise ValueError(f"parameter {name} is {p.dtype}: lowband syncs floating-point parameters")
    flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for _, p in named])
    return flat.contiguous(), [(name, list(p.shape)) for name, p in named]


def connect(model, cluster, key, coordinator, *, reconnect_ms=None, state_dir=None):
    """A `lowband.Site` for this model (its parameter count and tensors go in the join); with
    `state_dir`, its error feedback survives a restart (see `lowband.Site`)."""
    _, tensors = describe(model)
    count = sum(int(torch.Size(shape).numel()) for _, shape in tensors)
    return Site(cluster, key, coordinator, params=count, tensors=tensors, reconnect_ms=reconnect_ms,
                state_dir=state_dir)


def local_cluster(model, directory, *, sites, strategy, **options):
    """A `lowband.LocalCluster` for this model (its initial parameters and tensors)."""
    from .cluster import LocalCluster

    flat, tensors = describe(model)
    return LocalCluster(directory, sites=sites, strategy=strategy, initial=flat, tensors=tensors, **options)


class DiLoCo:
    """The outer loop of a PyTorch site (see the module's documentation). `site` is a
    `lowband.Site` (None on ranks other than 0 of a torchrun site). `sync_every`, if given, must
    equal the run's H (it is the strategy's: diloco@50 syncs every 50 inner steps).

    On entering: wait for the coordinator's initial parameters (every site starts from the same
    θ₀) and load them. `step(loss)` after every inner optimizer step; at a round's end it syncs.
    `finished` turns true once the final parameters are in the model. Leaving the block (or an
    exception, Ctrl-C included) leaves the run cleanly."""

    def __init__(self, model, inner_optimizer, site, sync_every=None, flat_views=True):
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.site = site
        self.named = parameters(model)
        self.tensors = [p for _, p in self.named]
        for name, p in self.named:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"parameter {name} is {p.dtype}: lowband syncs float32, bfloat16 and float16")
        self.count = sum(p.numel() for p in self.tensors)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        if self.rank == 0 and site is None:
            raise ValueError("rank 0 needs a lowband.Site (only the other ranks of a torchrun site pass None)")
        if self.rank != 0 and site is not None:
            raise ValueError(f"rank {self.rank} was given a Site: only rank 0 of a site talks to the coordinator")
        if site is not None:
            if site.params != self.count:
                raise ValueError(
                    f"this model has {self.count} parameters, the site was made for {site.params}"
                )
            if sync_every is not None and sync_every != site.inner_steps:
                raise ValueError(
                    f"sync_every={sync_every} but the run's strategy ({site.strategy}) syncs every {site.inner_steps} inner steps"
                )
        cuda = any(p.is_cuda for p in self.tensors)
        self.master = torch.empty(self.count, dtype=torch.float32, pin_memory=cuda)
        # A single-process CPU float32 model's parameters become views of the master buffer, so
        # lowband reads and writes them in place: nothing is copied on either way.
        self.zero_copy = flat_views and self.world == 1 and all(
            p.device.type == "cpu" and p.dtype == torch.float32 for p in self.tensors
        )
        if self.zero_copy:
            offset = 0
            with torch.no_grad():
                for p in self.tensors:
                    view = self.master[offset : offset + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view
                    offset += p.numel()
        self.round = None
        # (rounds, H, T: rank 0's, shared with every rank on entering.)
        self.rounds = self.inner_steps = self.steps = None
        self.steps_in_round = 0
        self.losses = []
        self.round_started = None
        self.finished = False
        # Seconds per round spent in lowband (copy out, encode, send, wait, receive, decode, copy in).
        self.sync_seconds = []

    # -- the flat buffer ----------------------------------------------------------------------
    def _copy_out(self):
        if self.zero_copy:
            return
        offset = 0
        for p in self.tensors:
            n = p.numel()
            self.master[offset : offset + n].copy_(p.detach().reshape(-1), non_blocking=True)
            offset += n
        if any(p.is_cuda for p in self.tensors):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _copy_in(self):
        if self.zero_copy:
            return
        offset = 0
        for p in self.tensors:
            n = p.numel()
            p.copy_(self.master[offset : offset + n].view_as(p), non_blocking=True)
            offset += n
        if any(p.is_cuda for p in self.tensors):
            torch.cuda.synchronize()

    def _share(self, round):
        """Rank 0's round and parameters to every rank of the site (torch.distributed)."""
        if self.world == 1:
            return round
        device = self.tensors[0].device
        meta = torch.tensor([-1 if round is None else round], dtype=torch.int64, device=device)
        dist.broadcast(meta, 0)
        round = None if meta.item() < 0 else int(meta.item())
        if round is not None:
            for p in self.tensors:
                dist.broadcast(p.data, 0)
        return round

    def _share_schedule(self):
        """Rank 0's rounds, H and T to every rank (once, on entering)."""
        site = self.site
        schedule = [site.rounds, site.inner_steps, site.steps] if site is not None else [0, 0, 0]
        if self.world > 1:
            shared = torch.tensor(schedule, dtype=torch.int64, device=self.tensors[0].device)
            dist.broadcast(shared, 0)
            schedule = [int(x) for x in shared.tolist()]
        self.rounds, self.inner_steps, self.steps = schedule

    def _receive(self):
        """Wait for the next global parameters (rank 0), load them, share them with the ranks."""
        round = None
        if self.site is not None:
            round = self.site.next_round(self.master)
            if round is not None:
                self._copy_in()
        round = self._share(round)
        if round is None or round >= self.rounds:
            self.finished = True
            if self.site is not None:
                self.site.leave()
        self.round = round
        self.steps_in_round = 0
        self.losses = []
        self.round_started = time.perf_counter()
        return round

    # -- the loop -----------------------------------------------------------------------------
    def __enter__(self):
        self._share_schedule()
        self._receive()
        return self

    def step(self, loss=None):
        """Call after every inner optimizer step (with the step's loss, for the report)."""
        if self.finished:
            raise RuntimeError("the run is over (DiLoCo.finished): stop the training loop")
        self.steps_in_round += 1
        if loss is not None:
            self.losses.append(float(loss.detach()) if hasattr(loss, "detach") else float(loss))
        if self.steps_in_round >= self._round_steps():
            self.sync()

    def _round_steps(self):
        return max(1, min(self.inner_steps, self.steps - self.round * self.inner_steps))

    def sync(self):
        """Send this round's update and load the next round's global parameters."""
        began = time.perf_counter()
        computed = began - self.round_started
        if self.site is not None:
            self._copy_out()
            self.site.send_update(self.round, self.master, computed, self.losses[-self.inner_steps :])
        self._receive()
        self.sync_seconds.append(time.perf_counter() - began)

    def __exit__(self, kind, error, traceback):
        if self.site is not None and self.site.connected:
            self.site.leave()
        return False
