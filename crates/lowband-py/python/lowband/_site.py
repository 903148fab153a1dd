"""A site's connection to a lowband coordinator, without torch: parameters cross as one flat
float32 buffer (a numpy array or a CPU torch tensor, contiguous), by address, never copied."""

import json

from . import _native

RefusedError = _native.RefusedError
ExcludedError = _native.ExcludedError


def buffer_address(buffer, writable):
    """(address, length) of a contiguous float32 CPU buffer: a torch tensor or anything with
    numpy's array interface. Raises ValueError naming what is wrong."""
    if hasattr(buffer, "data_ptr") and hasattr(buffer, "is_contiguous"):
        if str(buffer.dtype) != "torch.float32":
            raise ValueError(f"the parameter buffer is {buffer.dtype}, not torch.float32")
        if buffer.device.type != "cpu":
            raise ValueError(
                f"the parameter buffer is on {buffer.device}; copy it to a (pinned) CPU buffer first"
            )
        if not buffer.is_contiguous():
            raise ValueError("the parameter buffer is not contiguous")
        return buffer.data_ptr(), buffer.numel()
    interface = getattr(buffer, "__array_interface__", None)
    if interface is None:
        raise ValueError(
            f"a {type(buffer).__name__} is not a float32 buffer (pass a numpy array or a CPU tensor)"
        )
    if interface["typestr"] != "<f4":
        raise ValueError(f"the parameter buffer's type is {interface['typestr']}, not float32 (<f4)")
    if interface.get("strides") is not None:
        raise ValueError("the parameter buffer is not contiguous")
    address, read_only = interface["data"]
    if writable and read_only:
        raise ValueError("the parameter buffer is read-only")
    length = 1
    for size in interface["shape"]:
        length *= size
    return address, length


class Site:
    """One site of a run whose model is yours (PyTorch or anything that holds float32
    parameters). Joins the coordinator at `coordinator` ("host:port") with the key file `key`,
    for the run described by `cluster` (the cluster file the coordinator runs: a `[model]` and
    a `[cluster]` table). `params` is the model's parameter count and `tensors` its (name, shape)
    list in the flat buffer's order: a model that differs from the cluster's is refused, with an
    error naming both. Raises ConnectionError naming the address when the coordinator cannot be
    reached within the run's reconnect budget (or `reconnect_ms`). A coordinator that refuses
    this site (a key it does not list, run settings or a model that differ from its own) says
    so by closing the connection: the first `next_round` raises RefusedError with its reason.

    Every round: `next_round(buffer)` writes the global parameters into `buffer` and returns the
    round to train (`rounds` means: these are the final parameters); train `inner_steps` steps;
    `send_update(round, buffer)` with the trained parameters. Use it as a context manager (or
    call `leave()`) so that the coordinator learns at once when the site goes.

    With `state_dir`, the site keeps there what it must not lose across a restart (its error
    feedback's residual: what its codec has not sent yet, and its codec's random stream), saved
    after every update it sends (atomically; 4 bytes per parameter with error feedback), and
    restored when a site is made with the same directory (`restored_round`: the last round it
    had sent). A state of another run, site or model is refused with an error naming it."""

    def __init__(self, cluster, key, coordinator, *, params, tensors=None, reconnect_ms=None, state_dir=None):
        self._native = _native.Site(
            str(cluster),
            str(key),
            str(coordinator),
            int(params),
            None if tensors is None else [(str(n), [int(d) for d in s]) for n, s in tensors],
            reconnect_ms,
            None if state_dir is None else str(state_dir),
        )
        self.settings = json.loads(self._native.settings_json())

    index = property(lambda self: self._native.index, doc="This site's number in the run.")
    rounds = property(lambda self: self._native.rounds, doc="Rounds in the run.")
    inner_steps = property(lambda self: self._native.inner_steps, doc="Inner steps per round (H).")
    steps = property(lambda self: self._native.steps, doc="Inner steps in the run (T).")
    params = property(lambda self: self._native.params, doc="Parameters in the flat buffer.")
    strategy = property(lambda self: self._native.strategy, doc="The strategy's canonical name.")
    connected = property(lambda self: self._native.connected, doc="Not left, not finished.")
    restored_round = property(
        lambda self: self._native.restored_round,
        doc="The last round it had sent when restored from `state_dir` (None: started afresh).",
    )

    fragments = property(
        lambda self: self._native.fragments,
        doc="Streaming DiLoCo's fragments (P; 0 for whole-model rounds).",
    )
    overlap_steps = property(
        lambda self: self._native.overlap_steps,
        doc="Streaming: inner steps between a fragment's sync and the step its merge is mixed in.",
    )
    mix = property(
        lambda self: self._native.mix,
        doc="Streaming: the weight of the local fragment when its merge is mixed in.",
    )

    def end_step(self, round):
        """The step after which round `round`'s update is sent (streaming: a fragment's sync
        during training, or one of the P final syncs at `steps`)."""
        return self._native.end_step(int(round))

    def first_step(self, round):
        """The first step round `round` trains."""
        return self._native.first_step(int(round))

    def round_steps(self, round):
        """Inner steps round `round` trains: H, or what is left of T in the last round."""
        return max(0, min(self.inner_steps, self.steps - round * self.inner_steps))

    def next_round(self, buffer):
        """Wait for the next round's global parameters and write them into `buffer`. Returns the
        round to train (equal to `rounds`: the final parameters), or None when the run ended
        without them reaching this site. Ctrl-C leaves the run and raises KeyboardInterrupt."""
        address, length = buffer_address(buffer, writable=True)
        return self._native.next_round(address, length)

    def send_update(self, round, buffer, seconds=0.0, losses=(), report=True):
        """Send round `round`'s update from the trained parameters in `buffer` (with a training
        report, unless `report` is false: `seconds` of compute and the inner steps' losses, for
        the coordinator's report). Streaming: the update of the round's fragment. False if the
        connection was lost (the next `next_round` reconnects)."""
        address, length = buffer_address(buffer, writable=False)
        return self._native.send_update(
            int(round), address, length, float(seconds), [float(x) for x in losses], bool(report)
        )

    def next_merge(self, buffer, mix=None):
        """Streaming: wait for the coordinator's next merge and mix it into the trained
        parameters in `buffer` (over the fragment it changed: `mix`·local + (1 − `mix`)·global;
        `mix` defaults to the strategy's). Returns (round it opens, replaced in full): in full
        after a reconnect or rejoin (train on from `first_step(round)`) and at the end (round
        equal to `rounds`: the final parameters). None: the run ended without them reaching
        this site."""
        address, length = buffer_address(buffer, writable=True)
        return self._native.next_merge(address, length, float(self.mix if mix is None else mix))

    def leave(self):
        """Leave the run (the coordinator learns it at once)."""
        self._native.leave()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.leave()
        return False
