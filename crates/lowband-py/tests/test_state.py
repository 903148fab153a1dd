"""A PyTorch site's state across a restart (`state_dir`): its error feedback's residual is saved
after every update it sends and restored when the site is made again; a state of another run is
refused with an error naming it."""

import tempfile
import unittest
from pathlib import Path

import numpy

import helpers
import lowband
import lowband.torch as lt


class SiteState(unittest.TestCase):
    def setUp(self):
        helpers.binary()
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)
        # SparseLoCo keeps an error-feedback residual per site.
        self.cluster = lt.local_cluster(
            helpers.tiny_model(), self.directory.name, sites=1, strategy="sparseloco@5",
            overrides={"steps": 20, "network": {"join_timeout_ms": 5000}},
        )
        self.addCleanup(self.cluster.kill)
        self.state = Path(self.directory.name) / "site-state"

    def rounds(self, site, count, buffer):
        """Train `count` rounds by hand (a fixed nudge); the last round sent."""
        sent = None
        for _ in range(count):
            round = site.next_round(buffer)
            buffer -= 1e-3 * (numpy.arange(buffer.size, dtype=numpy.float32) % 7)
            self.assertTrue(site.send_update(round, buffer))
            sent = round
        return sent

    def test_a_restarted_site_gets_its_residual_back_and_finishes(self):
        buffer = numpy.zeros(self.cluster.params, dtype=numpy.float32)
        first = self.cluster.site(0, state_dir=self.state)
        self.assertIsNone(first.restored_round)
        sent = self.rounds(first, 2, buffer)
        self.assertTrue((self.state / "current.json").exists())
        # The process "dies" (no leave): a new site with the same directory takes its place.
        del first
        second = self.cluster.site(0, state_dir=self.state)
        self.assertEqual(second.restored_round, sent)
        with second:
            round = second.next_round(buffer)
            while round is not None and round < second.rounds:
                buffer -= 1e-3
                self.assertTrue(second.send_update(round, buffer))
                round = second.next_round(buffer)
        self.assertEqual(self.cluster.wait(timeout=60), 0, self.cluster.log_tail(40))

    def test_a_state_of_another_run_is_refused_naming_it(self):
        buffer = numpy.zeros(self.cluster.params, dtype=numpy.float32)
        site = self.cluster.site(0, state_dir=self.state)
        self.rounds(site, 1, buffer)
        site.leave()
        other = Path(self.directory.name) / "other.toml"
        other.write_text(self.cluster.cluster_file.read_text().replace("\nsteps = 20\n", "\nsteps = 25\n"))
        with self.assertRaisesRegex(ValueError, r"saved in another run"):
            lowband.Site(other, self.cluster.site_keys[0], self.cluster.address,
                         params=self.cluster.params, tensors=self.cluster.tensors, state_dir=self.state)


if __name__ == "__main__":
    unittest.main()
