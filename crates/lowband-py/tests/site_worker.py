"""One site as its own process (for the fault tests): python site_worker.py CLUSTER KEY ADDRESS
SITE STEP_SECONDS OUT. Trains the tests' small model through lowband.torch.DiLoCo and writes its
final parameters to OUT; prints "connected" once it holds the initial parameters."""

import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import helpers  # noqa: E402
import lowband.torch as lt  # noqa: E402

cluster, key, address, site, step_seconds, out = sys.argv[1:7]
torch.set_num_threads(1)
model = helpers.tiny_model()
connection = lt.connect(model, cluster, key, address, reconnect_ms=20000)
print("connected", flush=True)
final = helpers.train_site(model, connection, helpers.batches(int(site), 1000), float(step_seconds))
torch.save(final, out)
print("done", flush=True)
