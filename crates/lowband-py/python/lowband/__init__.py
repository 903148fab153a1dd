"""lowband for PyTorch sites: the Rust core (ed25519 keys, the signed QUIC site client, the
codecs) as a Python package that never imports torch itself.

This is the package's first piece: node keys. The site handle and the `lowband.torch` wrapper
build on it (issue 22)."""

from ._native import __version__, keygen, public_key

__all__ = ["__version__", "keygen", "public_key"]
