"""Streaming DiLoCo with PyTorch sites: a run through the package, the binary's coordinator and
QUIC equals Streaming DiLoCo written in plain PyTorch on the same batches (fp32 both ways); DDP
inside a streaming site (gloo); a compressed streaming run."""

import os
import tempfile
import unittest

import torch

import helpers
import lowband.torch as lt
from test_torch import run_sites

SITES, H, STEPS = 2, 5, 25
FRAGMENTS, OVERLAP, MIX = 2, 1, 0.5
# Fragment syncs after steps 2, 5, 7, ..., 22 (9 during training), then 2 final ones at 25.
ROUNDS = 9 + FRAGMENTS
EXACT = f"streaming@{H}[up=fp32;down=fp32;fragments={FRAGMENTS};overlap={OVERLAP};mix={MIX}]"


class StreamingSites(unittest.TestCase):
    def setUp(self):
        helpers.binary()
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)

    def cluster(self, strategy, name):
        cluster = lt.local_cluster(
            helpers.tiny_model(),
            os.path.join(self.directory.name, name),
            name=name,
            sites=SITES,
            strategy=strategy,
            overrides={"steps": STEPS, "inner_steps": H},
        )
        self.addCleanup(cluster.kill)
        return cluster

    def test_fp32_streaming_equals_plain_pytorch_streaming_diloco(self):
        cluster = self.cluster(EXACT, "exact")
        data = [helpers.batches(k, STEPS) for k in range(SITES)]
        results = run_sites(cluster, [helpers.tiny_model() for _ in range(SITES)], data)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        reference = helpers.plain_streaming(SITES, H, STEPS, FRAGMENTS, OVERLAP, MIX)
        for k, result in enumerate(results):
            self.assertLessEqual(helpers.relative_difference(result, reference), 1e-5, f"site {k}")
        # The schedule matters: mixing the merges in at once is another run, and the test sees it.
        other = helpers.plain_streaming(SITES, H, STEPS, FRAGMENTS, 0, MIX)
        self.assertGreater(helpers.relative_difference(other, reference), 1e-4)
        summary = cluster.summary()["strategies"][0]
        self.assertEqual(summary["rounds"], ROUNDS)
        # Each sync moves one fragment: about half of what a whole-model round moves.
        params = results[0].numel()
        self.assertLess(summary["inter_site_bytes"], SITES * ROUNDS * 2 * 4 * params)
        self.assertIsNotNone(summary["final_train_loss"])

    def test_a_compressed_streaming_run_ends_with_every_site_on_the_same_model(self):
        cluster = self.cluster(f"streaming@{H}[fragments={FRAGMENTS};overlap={OVERLAP}]", "int4")
        data = [helpers.batches(k, STEPS) for k in range(SITES)]
        results = run_sites(cluster, [helpers.tiny_model() for _ in range(SITES)], data)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        self.assertTrue(torch.equal(results[0], results[1]))
        reference = helpers.plain_streaming(SITES, H, STEPS, FRAGMENTS, OVERLAP, 0.5)
        self.assertLess(helpers.relative_difference(results[0], reference), 0.05)

    def test_ddp_inside_a_streaming_site_over_gloo(self):
        cluster = self.cluster(EXACT, "ddp")
        rank0, rank1, other = helpers.run_ddp_site(cluster, self.directory.name, STEPS)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        self.assertTrue(torch.equal(rank0, other))
        self.assertTrue(torch.equal(rank1, other))
        reference = helpers.plain_streaming(SITES, H, STEPS, FRAGMENTS, OVERLAP, MIX)
        self.assertLess(helpers.relative_difference(other, reference), 1e-4)


if __name__ == "__main__":
    unittest.main()
