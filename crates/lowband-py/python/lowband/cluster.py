"""A local cluster: the coordinator (the `lowband` binary, a child process), its keys and its
cluster file, for quick starts and tests on one machine. The sites are yours (`lowband.Site`,
`lowband.torch.DiLoCo`), in this process or others; across machines, copy the cluster file and
each site's key, and give the sites the coordinator's real address."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from . import _native
from ._site import buffer_address

_ADDRESS_WAIT_S = 60.0


def find_binary(binary=None):
    """The `lowband` binary: `binary`, else $LOWBAND_BIN, else `lowband` on the PATH."""
    for candidate in (binary, os.environ.get("LOWBAND_BIN"), shutil.which("lowband")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(
        "no lowband binary: build it (cargo install --path crates/lowband-cli, or cargo build "
        "--release and set LOWBAND_BIN=target/release/lowband) or pass binary=PATH"
    )


class LocalCluster:
    """Write a cluster for `sites` sites of a model (its flat float32 `initial` parameters and
    optionally its `tensors`, (name, shape) in order) under `directory`, and start its
    coordinator listening on `listen` (port 0: any free port; `address` is the real one).

    `strategy` is any strategy the binary knows ("diloco@50", "sparseloco@14[...]", ...);
    `config` a run file to start from (e.g. configs/reference.toml) and `overrides` a dict of
    run-file fields over it ({"steps": 200, "optimizer": {"lr": 2e-3}, "network": {...}}).
    Files: `directory`/coordinator.key, site-K.key, initial.safetensors, cluster.toml; the
    coordinator's report in `directory`/runs/`name`/ (report.md, summary.json, plots)."""

    def __init__(
        self,
        directory,
        *,
        sites,
        strategy,
        initial,
        tensors=None,
        config=None,
        overrides=None,
        tokens_per_step=None,
        listen="127.0.0.1:0",
        name="torch",
        binary=None,
        start=True,
    ):
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = find_binary(binary)
        self.name = name
        self.listen = listen
        self.coordinator_key = self.directory / "coordinator.key"
        coordinator_public = _native.keygen(str(self.coordinator_key), True)
        self.site_keys = [self.directory / f"site-{k}.key" for k in range(sites)]
        site_public = [_native.keygen(str(path), True) for path in self.site_keys]
        self.initial = self.directory / "initial.safetensors"
        address, length = buffer_address(initial, writable=False)
        _native.write_initial(str(self.initial), address, length)
        self.params = length
        self.tensors = tensors
        self.cluster_file = self.directory / "cluster.toml"
        _native.cluster_file(
            str(self.cluster_file),
            strategy,
            coordinator_public,
            site_public,
            length,
            str(self.initial),
            None if tensors is None else [(str(n), [int(d) for d in s]) for n, s in tensors],
            tokens_per_step,
            None if config is None else str(config),
            None if overrides is None else json.dumps(overrides),
        )
        self.process = None
        self.address = None
        if start:
            self.start()

    @property
    def run_dir(self):
        return self.directory / "runs" / self.name

    def start(self, resume=False):
        """Start the coordinator (again, after `kill`, with `resume=True`: from the state it
        saved after its last closed round; the sites reconnect by themselves)."""
        address_file = self.directory / "coordinator.address"
        if address_file.exists():
            address_file.unlink()
        command = [
            self.binary,
            "coordinator",
            "--config", str(self.cluster_file),
            "--key", str(self.coordinator_key),
            "--listen", self.listen if self.address is None else self.address,
            "--address-file", str(address_file),
            "--runs-dir", str(self.directory / "runs"),
            "--name", self.name,
        ]
        if resume:
            command.append("--resume")
        self.log = open(self.directory / "coordinator.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _ADDRESS_WAIT_S
        while not address_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the coordinator exited with {self.process.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the coordinator did not listen within {_ADDRESS_WAIT_S} s")
            time.sleep(0.02)
        self.address = address_file.read_text().strip()
        return self.address

    def log_tail(self, lines=20):
        path = self.directory / "coordinator.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def site(self, k, *, params=None, tensors=None, reconnect_ms=None, state_dir=None):
        """A `lowband.Site` for site `k` (connects now)."""
        from ._site import Site

        return Site(
            self.cluster_file,
            self.site_keys[k],
            self.address,
            params=self.params if params is None else params,
            tensors=self.tensors if tensors is None else tensors,
            reconnect_ms=reconnect_ms,
            state_dir=state_dir,
        )

    def wait(self, timeout=None):
        """Wait for the coordinator to finish; its exit code (0: the run completed)."""
        code = self.process.wait(timeout=timeout)
        if not self.log.closed:
            self.log.close()
        return code

    def summary(self):
        """The coordinator's summary.json (the ledger's bytes, rounds, losses, dollars)."""
        return json.loads((self.run_dir / "summary.json").read_text())

    def kill(self):
        """Kill the coordinator at once (SIGKILL: no goodbye, as a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and not self.log.closed:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        return False
