"""lowband for PyTorch sites: lowband's Rust core (ed25519 keys, the signed QUIC site client,
the codecs with error feedback) as a Python package that never imports torch itself.

- `keygen(path)`, `public_key(path)`: node keys, in the `lowband` binary's format.
- `Site`: one site's connection to a coordinator, flat float32 parameters in and out.
- `LocalCluster`: a coordinator (the `lowband` binary, as a child process) and its files, for
  quick starts and tests on one machine.
- `lowband.torch`: `DiLoCo`, the wrapper a PyTorch training loop uses (imports torch)."""

from ._native import __version__, keygen, public_key
from ._site import ExcludedError, RefusedError, Site
from .cluster import LocalCluster, find_binary

__all__ = [
    "__version__",
    "keygen",
    "public_key",
    "Site",
    "RefusedError",
    "ExcludedError",
    "LocalCluster",
    "find_binary",
]
