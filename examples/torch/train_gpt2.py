#!/usr/bin/env python3
"""Train a Hugging Face `transformers` GPT-2 across K lowband sites on one machine.

    python examples/torch/train_gpt2.py --corpus kjv.txt --sites 4 --strategy diloco@50 \
        --steps 1000 --seed 0 --config configs/reference.toml --json out.json

Starts a coordinator (the `lowband` binary: $LOWBAND_BIN or `lowband` on the PATH) and K site
processes, each a plain PyTorch training loop wrapped in `lowband.torch.DiLoCo`. The model is
`GPT2LMHeadModel` in the `small` shape (4 layers, width 128, 4 heads, context 128, a 256-byte
vocabulary, tied head, tanh GELU), trained on the corpus's bytes under the reference protocol
(`configs/reference.toml`, `shared/reference/diloco_torch.py`): the first 95% of the bytes train,
the last 5% validate; the training bytes are cut into K contiguous shards; every inner step a
site draws `site_batch` random windows of 128 bytes from its shard; AdamW (betas 0.9/0.95, eps
1e-8, weight decay 0.1 on 2-D weights), grad-norm clip 1.0, lr warmup min(100, steps/10) then
cosine to 10%; the strategy's H and codecs, the outer Nesterov step and everything on the wire
are lowband's. `--torchrun-ranks R` runs each site as R processes under torch.distributed (DDP
inside the site: gloo on CPU, NCCL on CUDA; each rank takes its share of the site's batch). With
a CUDA device the sites use it (and share it).

Writes OUT: the final validation loss (site 0 evaluates the final global parameters on the whole
validation split, windows of 128), the ledger's bytes and the run's figures from the
coordinator's summary, and lowband's per-round overhead on the sites.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONTEXT = 128


def arguments():
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--corpus", required=True, help="a text file: its bytes are the tokens")
    a.add_argument("--sites", type=int, default=4)
    a.add_argument("--strategy", default="diloco@50", help="any lowband strategy: diloco@50, sparseloco@14, ...")
    a.add_argument("--steps", type=int, default=1000)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--config", help="a lowband run file to start from (e.g. configs/reference.toml)")
    a.add_argument("--torchrun-ranks", type=int, default=1, help="processes per site (DDP inside it)")
    a.add_argument("--json", required=True, help="where the results go")
    a.add_argument("--directory", help="the cluster's files and report (default: a temporary directory)")
    a.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    # Internal: one site (a child process of the launcher, or one rank under torch.distributed).
    a.add_argument("--site", type=int, help=argparse.SUPPRESS)
    a.add_argument("--cluster-directory", help=argparse.SUPPRESS)
    a.add_argument("--address", help=argparse.SUPPRESS)
    return a.parse_args()


def gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=128, n_layer=4, n_head=4,
        activation_function="gelu_new", tie_word_embeddings=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def corpus(path, sites):
    raw = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    cut = int(len(raw) * 0.95)
    train, validation = raw[:cut], raw[cut:]
    shard = len(train) // sites
    return [train[k * shard : (k + 1) * shard] for k in range(sites)], validation


def draw(source, generator, count):
    starts = torch.randint(len(source) - CONTEXT - 1, (count,), generator=generator)
    x = torch.stack([source[i : i + CONTEXT] for i in starts])
    y = torch.stack([source[i + 1 : i + CONTEXT + 1] for i in starts])
    return x, y


def loss_of(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def validate(model, validation, device):
    count = (len(validation) - 1) // CONTEXT
    total = 0.0
    for start in range(0, count, 64):
        index = torch.arange(start, min(count, start + 64)) * CONTEXT
        x = torch.stack([validation[i : i + CONTEXT] for i in index]).to(device)
        y = torch.stack([validation[i + 1 : i + CONTEXT + 1] for i in index]).to(device)
        total += loss_of(model, x, y).item() * len(index)
    return total / count


def lr_at(step, peak, steps):
    warm = min(100, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))


def run_site(args):
    """One site (or one rank of it): the training loop, wrapped in lowband.torch.DiLoCo."""
    import torch.distributed as dist

    import lowband.torch as lt

    directory = Path(args.cluster_directory)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if ranks > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    model = gpt2(args.seed).to(device)
    if ranks > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    site = None
    if rank == 0:
        site = lt.connect(model, directory / "cluster.toml", directory / f"site-{args.site}.key", args.address)
        settings = site.settings
    settings_box = [settings if rank == 0 else None]
    if ranks > 1:
        dist.broadcast_object_list(settings_box, 0)
    settings = settings_box[0]
    optimizer_settings = settings["optimizer"]
    module = getattr(model, "module", model)
    decay = [p for p in module.parameters() if p.dim() >= 2]
    rest = [p for p in module.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optimizer_settings["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=optimizer_settings["lr"], betas=(optimizer_settings["beta1"], optimizer_settings["beta2"]),
        eps=optimizer_settings["eps"],
    )
    shards, validation = corpus(args.corpus, settings["sites"])
    shard = shards[args.site]
    generator = torch.Generator().manual_seed(settings["seed"] * 1000 + args.site)
    batch, steps = settings["site_batch"], settings["steps"]
    with lt.DiLoCo(model, optimizer, site) as diloco:
        while not diloco.finished:
            step = diloco.inner_step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, optimizer_settings["lr"], steps)
            x, y = draw(shard, generator, batch)
            x, y = x[rank::ranks].to(device), y[rank::ranks].to(device)
            loss = loss_of(model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer_settings["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            diloco.step(loss)
    if rank == 0:
        result = {"site": args.site, "sync_seconds": diloco.sync_seconds}
        if args.site == 0:
            result["final_val_loss"] = validate(module, validation, device)
        (directory / f"site-{args.site}.json").write_text(json.dumps(result))
    if ranks > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(args):
    """The coordinator and K site processes; the results in --json."""
    import lowband.torch as lt

    directory = Path(args.directory or tempfile.mkdtemp(prefix="lowband-gpt2-"))
    model = gpt2(args.seed)
    overrides = {"steps": args.steps, "seed": args.seed, "network": {"join_timeout_ms": 600000}}
    cluster = lt.local_cluster(
        model, directory, sites=args.sites, strategy=args.strategy, config=args.config,
        overrides=overrides, tokens_per_step=None,
    )
    processes_per_site = args.torchrun_ranks
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.sites * processes_per_site))
    began = time.perf_counter()
    sites = []
    for k in range(args.sites):
        site_arguments = [
            __file__, "--corpus", args.corpus, "--sites", str(args.sites), "--strategy", args.strategy,
            "--steps", str(args.steps), "--seed", str(args.seed), "--json", args.json, "--site", str(k),
            "--cluster-directory", str(directory), "--address", cluster.address, "--threads", str(threads),
        ]
        if processes_per_site > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes_per_site),
                       "--master-port", str(29500 + k), *site_arguments]
        else:
            command = [sys.executable, *site_arguments]
        log = open(directory / f"site-{k}.log", "wb")
        sites.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for k, (process, log) in enumerate(sites):
        if process.wait() != 0:
            failed.append(k)
        log.close()
    code = cluster.wait(timeout=120)
    if failed or code != 0:
        tails = "\n".join(f"site {k}: " + (directory / f"site-{k}.log").read_text()[-2000:] for k in failed)
        sys.exit(f"the run failed (coordinator exit {code}):\n{cluster.log_tail()}\n{tails}")
    seconds = time.perf_counter() - began
    summary = cluster.summary()["strategies"][0]
    results = [json.loads((directory / f"site-{k}.json").read_text()) for k in range(args.sites)]
    sync = [s for r in results for s in r["sync_seconds"]]
    out = {
        "strategy": summary["strategy"], "sites": args.sites, "steps": args.steps, "seed": args.seed,
        "torchrun_ranks": processes_per_site, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "params": summary["params"], "rounds": summary["rounds"],
        "final_val_loss": results[0]["final_val_loss"], "final_train_loss": summary.get("final_train_loss"),
        "inter_site_bytes": summary["inter_site_bytes"], "egress_dollars": summary["egress_dollars"],
        "sync_seconds_median": sorted(sync)[len(sync) // 2] if sync else None,
        "wall_seconds": round(seconds, 1), "run_directory": str(cluster.run_dir),
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    arguments_ = arguments()
    if arguments_.site is not None:
        run_site(arguments_)
    else:
        launch(arguments_)
