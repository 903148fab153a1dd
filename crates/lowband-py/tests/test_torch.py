"""lowband.torch against plain PyTorch: a run through the package, the binary's coordinator and
QUIC equals DiLoCo written in plain PyTorch on the same batches (fp32 codec); DDP inside a site
(gloo); compressed strategies; bf16 parameters."""

import os
import subprocess
import tempfile
import threading
import unittest

import torch

import helpers
import lowband.torch as lt

SITES, H, STEPS = 2, 5, 25  # 5 rounds


def run_sites(cluster, models, data, step_seconds=0.0):
    """Every site in a thread of this process (the GIL is released while lowband waits)."""
    results, errors = [None] * len(models), []

    def site(k):
        try:
            connection = cluster.site(k)
            results[k] = helpers.train_site(models[k], connection, data[k], step_seconds)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=site, args=(k,)) for k in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


class TorchSites(unittest.TestCase):
    def setUp(self):
        helpers.binary()
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)

    def cluster(self, strategy, name="torch", overrides_network=None, **options):
        overrides = {"steps": STEPS, "inner_steps": H}
        if overrides_network:
            overrides["network"] = overrides_network
        cluster = lt.local_cluster(
            helpers.tiny_model(),
            os.path.join(self.directory.name, name),
            name=name,
            sites=SITES,
            strategy=strategy,
            overrides=overrides,
            **options,
        )
        self.addCleanup(cluster.kill)
        return cluster

    def test_fp32_run_equals_plain_pytorch_diloco(self):
        cluster = self.cluster(f"diloco@{H}")
        data = [helpers.batches(k, STEPS) for k in range(SITES)]
        results = run_sites(cluster, [helpers.tiny_model() for _ in range(SITES)], data)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        reference = helpers.plain_diloco(SITES, H, STEPS)
        for k, result in enumerate(results):
            difference = helpers.relative_difference(result, reference)
            self.assertLessEqual(difference, 1e-5, f"site {k}")
        summary = cluster.summary()["strategies"][0]
        self.assertEqual(summary["rounds"], STEPS // H)
        # Every site sent 5 updates and got the initial, 4 merged and the final parameters.
        self.assertGreater(summary["inter_site_bytes"], 2 * 10 * 4 * results[0].numel())
        self.assertIsNotNone(summary["final_train_loss"])
        self.assertIsNone(summary["final_val_loss"])
        report = (cluster.run_dir / "report.md").read_text()
        self.assertIn("An external model (PyTorch sites)", report)
        # The charts show the training loss the sites reported, one point per round.
        chart = (cluster.run_dir / "loss_vs_tokens.svg").read_text()
        self.assertIn("training loss", chart)
        # The planner prices the run on its measured traffic, saying the gap is not measured.
        plan = subprocess.run(
            [helpers.binary(), "plan", "--params", "1B", "--from-run", str(cluster.run_dir)],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(plan.returncode, 0, plan.stderr)
        self.assertIn("an external model: its loss gap is not measured", plan.stdout)

    def test_a_compressed_strategy_sends_less_and_sites_agree(self):
        fp32 = self.cluster(f"diloco@{H}", name="fp32")
        data = [helpers.batches(k, STEPS) for k in range(SITES)]
        run_sites(fp32, [helpers.tiny_model() for _ in range(SITES)], data)
        self.assertEqual(fp32.wait(timeout=60), 0, fp32.log_tail())
        int8 = self.cluster(f"diloco-int8@{H}", name="int8")
        results = run_sites(int8, [helpers.tiny_model() for _ in range(SITES)], data)
        self.assertEqual(int8.wait(timeout=60), 0, int8.log_tail())
        # Every site ends holding the same final global parameters.
        self.assertTrue(torch.equal(results[0], results[1]))
        sent = {c.name: c.summary()["strategies"][0]["inter_site_bytes"] for c in (fp32, int8)}
        self.assertLess(sent["int8"], sent["fp32"])
        reference = helpers.plain_diloco(SITES, H, STEPS)
        self.assertLess(helpers.relative_difference(results[0], reference), 0.05)

    def test_bf16_parameters_sync_through_float32_masters(self):
        cluster = self.cluster(f"diloco@{H}")
        data = [helpers.batches(k, STEPS) for k in range(SITES)]
        models = [helpers.tiny_model(torch.bfloat16) for _ in range(SITES)]
        results = run_sites(cluster, models, data)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        self.assertTrue(all(p.dtype == torch.bfloat16 for p in models[0].parameters()))
        self.assertTrue(torch.equal(results[0], results[1]))
        reference = helpers.plain_diloco(SITES, H, STEPS)
        self.assertLess(helpers.relative_difference(results[0], reference), 0.05)

    def test_a_site_whose_model_goes_nan_stops_with_a_clear_error_and_the_run_goes_on(self):
        cluster = self.cluster(f"diloco@{H}", overrides_network={"quorum": 1, "round_deadline_ms": 2000})
        honest_result = [None]

        def honest():
            honest_result[0] = helpers.train_site(helpers.tiny_model(), cluster.site(0), helpers.batches(0, STEPS))

        thread = threading.Thread(target=honest)
        thread.start()
        model = helpers.tiny_model()
        with self.assertRaisesRegex(ValueError, "non-finite value at index 0: local training diverged"):
            with lt.DiLoCo(model, torch.optim.AdamW(model.parameters()), cluster.site(1)) as diloco:
                while not diloco.finished:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.fill_(float("nan"))
                    diloco.step()
        thread.join(timeout=120)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        # The site left (nothing of the NaNs was sent); the other finished with finite parameters.
        self.assertIn("site 1 left", cluster.log_tail(lines=200))
        self.assertTrue(torch.isfinite(honest_result[0]).all())

    def test_a_cpu_float32_model_is_synced_in_place(self):
        cluster = self.cluster(f"diloco@{H}")
        model = helpers.tiny_model()
        before = helpers.flat(model)
        site = cluster.site(0)
        self.addCleanup(site.leave)
        diloco = lt.DiLoCo(model, torch.optim.AdamW(model.parameters()), site)
        self.assertTrue(diloco.zero_copy)
        start = diloco.master.data_ptr()
        end = start + 4 * diloco.master.numel()
        for p in model.parameters():
            self.assertTrue(start <= p.data_ptr() < end, "a parameter outside the flat buffer")
        self.assertTrue(torch.equal(diloco.master, before))  # the values are kept
        bf16 = helpers.tiny_model(torch.bfloat16)
        self.assertFalse(lt.DiLoCo(bf16, torch.optim.AdamW(bf16.parameters()), site).zero_copy)

    def test_ddp_inside_a_site_over_gloo(self):
        cluster = self.cluster(f"diloco@{H}")
        rank0, rank1, other = helpers.run_ddp_site(cluster, self.directory.name, STEPS)
        self.assertEqual(cluster.wait(timeout=60), 0, cluster.log_tail())
        # Both ranks hold the final global parameters, bitwise those the other site got.
        self.assertTrue(torch.equal(rank0, other))
        self.assertTrue(torch.equal(rank1, other))
        # Two ranks on half batches each = one process on the whole batch, up to the all-reduce's
        # rounding: the plain DiLoCo of the same data.
        reference = helpers.plain_diloco(SITES, H, STEPS)
        self.assertLess(helpers.relative_difference(other, reference), 1e-4)


if __name__ == "__main__":
    unittest.main()
