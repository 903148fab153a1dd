"""Bad input gets a clear Python exception, never a hang or a crash: a model that differs from
the cluster's (both sides' checks), a key the coordinator does not list, an unreachable
coordinator, wrong buffers, FSDP-sharded models, a sync interval that is not the run's."""

import re
import tempfile
import time
import unittest
from pathlib import Path

import numpy
import torch

import helpers
import lowband
import lowband.torch as lt


class BadInput(unittest.TestCase):
    def setUp(self):
        helpers.binary()
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)
        self.cluster = lt.local_cluster(
            helpers.tiny_model(), self.directory.name, sites=2, strategy="diloco@5",
            overrides={"steps": 10, "network": {"join_timeout_ms": 5000}},
        )
        self.addCleanup(self.cluster.kill)

    def edited_cluster_file(self, old, new):
        text = self.cluster.cluster_file.read_text()
        self.assertIn(old, text)
        path = Path(self.directory.name) / "edited.toml"
        path.write_text(text.replace(old, new))
        return path

    def test_a_model_with_another_parameter_count_is_refused_naming_both(self):
        bigger = torch.nn.Sequential(torch.nn.Linear(8, 17), torch.nn.Tanh(), torch.nn.Linear(17, 4))
        with self.assertRaisesRegex(ValueError, r"this model has 225 parameters, the cluster's has 212"):
            lt.connect(bigger, self.cluster.cluster_file, self.cluster.site_keys[0], self.cluster.address)

    def test_a_model_with_other_shapes_is_refused_naming_the_tensor(self):
        tensors = [(n, s) for n, s in self.cluster.tensors]
        tensors[0] = (tensors[0][0], [8, 16])  # same count, transposed
        with self.assertRaisesRegex(ValueError, r"tensor 0: 0.weight \[8, 16\] here, 0.weight \[16, 8\] there"):
            lowband.Site(self.cluster.cluster_file, self.cluster.site_keys[0], self.cluster.address,
                         params=self.cluster.params, tensors=tensors)

    def test_the_coordinator_refuses_a_site_whose_run_file_differs(self):
        # The site's own file agrees with its model, the coordinator's does not: refused at the
        # join (the first wait for parameters raises it), naming the field and both values.
        path = self.edited_cluster_file("\nsteps = 10\n", "\nsteps = 20\n")
        site = lowband.Site(path, self.cluster.site_keys[0], self.cluster.address, params=self.cluster.params,
                            tensors=self.cluster.tensors)
        with self.assertRaises(lowband.RefusedError) as refused:
            site.next_round(numpy.zeros(self.cluster.params, dtype=numpy.float32))
        self.assertIn("run.steps (coordinator 10, site 20)", str(refused.exception))

    def test_a_key_the_coordinator_does_not_list_is_refused(self):
        stranger = Path(self.directory.name) / "stranger.key"
        stranger_public = lowband.keygen(stranger)
        listed = lowband.public_key(self.cluster.site_keys[1])
        path = self.edited_cluster_file(listed, stranger_public)
        with self.assertRaisesRegex(lowband.RefusedError, "does not list your key"):
            site = lowband.Site(path, stranger, self.cluster.address, params=self.cluster.params,
                                tensors=self.cluster.tensors, reconnect_ms=5000)
            site.next_round(numpy.zeros(self.cluster.params, dtype=numpy.float32))

    def test_a_key_that_is_not_in_the_cluster_file_is_refused_before_connecting(self):
        stranger = Path(self.directory.name) / "stranger.key"
        lowband.keygen(stranger)
        with self.assertRaisesRegex(ValueError, "is not one of the cluster's sites"):
            lowband.Site(self.cluster.cluster_file, stranger, self.cluster.address, params=self.cluster.params)

    def test_an_unreachable_coordinator_raises_naming_the_address_in_bounded_time(self):
        self.cluster.kill()
        began = time.monotonic()
        with self.assertRaisesRegex(ConnectionError, re.escape(self.cluster.address)):
            lowband.Site(self.cluster.cluster_file, self.cluster.site_keys[0], self.cluster.address,
                         params=self.cluster.params, reconnect_ms=1500)
        self.assertLess(time.monotonic() - began, 15)

    def test_buffers_must_be_contiguous_float32_of_the_model_size(self):
        site = self.cluster.site(0)
        self.addCleanup(site.leave)
        with self.assertRaisesRegex(ValueError, "float32"):
            site.next_round(numpy.zeros(self.cluster.params, dtype=numpy.float64))
        with self.assertRaisesRegex(ValueError, "holds 3 values, the model has 212"):
            site.next_round(numpy.zeros(3, dtype=numpy.float32))
        with self.assertRaisesRegex(ValueError, "not contiguous"):
            site.next_round(torch.zeros(2 * self.cluster.params)[::2])

    def test_sync_every_must_be_the_runs(self):
        model = helpers.tiny_model()
        site = self.cluster.site(0)
        self.addCleanup(site.leave)
        optimizer = torch.optim.AdamW(model.parameters())
        with self.assertRaisesRegex(ValueError, "syncs every 5 inner steps"):
            lt.DiLoCo(model, optimizer, site, sync_every=7)

    def test_fsdp_sharded_models_are_refused(self):
        import torch.distributed as dist

        init = Path(self.directory.name) / "fsdp-init"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
        self.addCleanup(dist.destroy_process_group)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # pragma: no cover - torch older than 2.6
            from torch.distributed._composable.fsdp import fully_shard
        model = helpers.tiny_model()
        fully_shard(model)
        with self.assertRaisesRegex(ValueError, "FSDP-sharded models are not supported"):
            lt.describe(model)


if __name__ == "__main__":
    unittest.main()
