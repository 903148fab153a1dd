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

With a streaming strategy (`streaming@H[fragments=P;overlap=τ;mix=α]`, Streaming DiLoCo) the
same loop syncs one fragment of the parameters at a time, at the run's fragment steps, without
waiting: the coordinator's merge is mixed into the model τ inner steps later (waiting only if it
has not arrived by then), as lowband's own sites do.

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
        # (rounds, H, T, streaming's P, τ, α and the rounds' end steps: rank 0's, shared with
        # every rank on entering.)
        self.rounds = self.inner_steps = self.steps = None
        self.fragments, self.overlap_steps, self.mix, self.end_steps = 0, 0, 0.0, []
        self.steps_in_round = 0
        self.losses = []
        self.round_started = None
        self.finished = False
        # Streaming: the run's inner step the model is at, the step the merge in flight is mixed
        # in at (None: none in flight), and whether rank 0 lost its connection on a send (its
        # next merge is then the parameters in full).
        self.step_index = 0
        self.due_step = None
        self.resync = False
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
        """Rank 0's schedule to every rank (once, on entering): rounds, H, T, and streaming's
        P, τ, α with every round's end step."""
        site = self.site
        schedule = [0.0] * 7
        if site is not None:
            schedule = [site.rounds, site.inner_steps, site.steps, site.fragments,
                        site.overlap_steps, site.mix, site.rounds if site.fragments else 0]
        if self.world > 1:
            shared = torch.tensor(schedule, dtype=torch.float64, device=self.tensors[0].device)
            dist.broadcast(shared, 0)
            schedule = shared.tolist()
        rounds, h, t, p, overlap, mix, ends = schedule
        self.rounds, self.inner_steps, self.steps = int(rounds), int(h), int(t)
        self.fragments, self.overlap_steps, self.mix = int(p), int(overlap), float(mix)
        if site is not None:
            self.end_steps = [site.end_step(r) for r in range(int(ends))]
        else:
            self.end_steps = [0] * int(ends)
        if self.world > 1 and self.end_steps:
            shared = torch.tensor(self.end_steps, dtype=torch.int64, device=self.tensors[0].device)
            dist.broadcast(shared, 0)
            self.end_steps = [int(x) for x in shared.tolist()]

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
    @property
    def inner_step(self):
        """The run's inner step the model trains next (0 to T - 1): what a learning-rate
        schedule follows. It moves back after parameters are taken in full (a rejoin)."""
        if self.fragments:
            return self.step_index
        return self.round * self.inner_steps + self.steps_in_round

    def __enter__(self):
        self._share_schedule()
        round = self._receive()
        if self.fragments and round is not None and not self.finished:
            self._start_at(round)
        return self

    def step(self, loss=None):
        """Call after every inner optimizer step (with the step's loss, for the report)."""
        if self.finished:
            raise RuntimeError("the run is over (DiLoCo.finished): stop the training loop")
        self.steps_in_round += 1
        if loss is not None:
            self.losses.append(float(loss.detach()) if hasattr(loss, "detach") else float(loss))
        if self.fragments:
            self._streaming_step()
        elif self.steps_in_round >= self._round_steps():
            self.sync()

    def _round_steps(self):
        return max(1, min(self.inner_steps, self.steps - self.round * self.inner_steps))

    def sync(self):
        """Send this round's update and load the next round's global parameters (round
        strategies; a streaming run syncs its fragments from `step`)."""
        if self.fragments:
            raise RuntimeError("a streaming run syncs its fragments from step(): call step() after every inner step")
        began = time.perf_counter()
        computed = began - self.round_started
        if self.site is not None:
            self._copy_out()
            self.site.send_update(self.round, self.master, computed, self.losses[-self.inner_steps :])
        self._receive()
        self.sync_seconds.append(time.perf_counter() - began)

    # -- streaming ----------------------------------------------------------------------------
    def _start_at(self, round):
        """Train on from the first step of `round` (the start, or parameters taken in full after
        a reconnect); at or past T only the final syncs remain."""
        self.round = round
        self.step_index = 0 if round == 0 else self.end_steps[round - 1]
        self.due_step = None
        self.losses = []
        if self.step_index >= self.steps:
            self._final_syncs()

    def _streaming_step(self):
        """After inner step `step_index`: the fragment sync due there (a merge still in flight is
        mixed in first), and the merge due before the next step."""
        self.step_index += 1
        if self.step_index >= self.steps:
            if self.due_step is not None and self._merge(self.mix):
                return
            self._final_syncs()
            return
        if self.step_index == self.end_steps[self.round]:
            if self.due_step is not None and self._merge(self.mix):
                return
            began = time.perf_counter()
            self._send(report=True)
            self.sync_seconds.append(time.perf_counter() - began)
            self.due_step = self.step_index + self.overlap_steps
            self.round += 1
        if self.due_step is not None and self.due_step <= self.step_index:
            self._merge(self.mix)

    def _send(self, report):
        """Rank 0: this round's fragment update (with the steps' report)."""
        if self.site is None:
            return
        computed = time.perf_counter() - self.round_started
        self._copy_out()
        sent = self.site.send_update(
            self.round, self.master, computed, self.losses[-self.inner_steps :],
            report=report and bool(self.losses),
        )
        self.losses = []
        self.round_started = time.perf_counter()
        if not sent:
            # The connection was lost: the next merge is the parameters in full, after reconnecting.
            self.resync = True

    def _merge(self, mix):
        """The merge in flight, mixed into the model (rank 0 receives, every rank gets the
        result). True if the position changed: parameters in full (train on from their round's
        first step) or the run's end."""
        began = time.perf_counter()
        merged = None
        if self.site is not None:
            if self.resync:
                self.resync = False
                round = self.site.next_round(self.master)
                merged = None if round is None else (round, True)
            else:
                self._copy_out()
                merged = self.site.next_merge(self.master, mix)
            if merged is not None:
                self._copy_in()
        merged = self._share_merge(merged)
        self.due_step = None
        self.round_started = time.perf_counter()
        self.sync_seconds.append(time.perf_counter() - began)
        if merged is None or merged[0] >= self.rounds:
            self._end()
            return True
        round, full = merged
        if full:
            self._start_at(round)
            return True
        return False

    def _share_merge(self, merged):
        """Rank 0's merge (round, in full) and the model's parameters to every rank."""
        if self.world == 1:
            return merged
        device = self.tensors[0].device
        meta = [-1, 0] if merged is None else [merged[0], int(merged[1])]
        meta = torch.tensor(meta, dtype=torch.int64, device=device)
        dist.broadcast(meta, 0)
        if meta[0].item() < 0:
            return None
        for p in self.tensors:
            dist.broadcast(p.data, 0)
        return int(meta[0].item()), bool(meta[1].item())

    def _final_syncs(self):
        """At step T: every fragment once more, back to back (the last steps' report with the
        first), then the final parameters."""
        report = True
        while not self.finished and self.round < self.rounds:
            self._send(report=report)
            report = False
            self.round += 1
            if self._merge(0.0):
                return

    def _end(self):
        self.finished = True
        if self.site is not None:
            self.site.leave()

    def __exit__(self, kind, error, traceback):
        if self.site is not None and self.site.connected:
            self.site.leave()
        return False
