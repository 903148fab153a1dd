"""The short CI version of the agreement benchmark (bench/torch_agreement.py, docs/results.md):
examples/torch/train_gpt2.py (a transformers GPT-2 in lowband.torch sites, through the binary's
coordinator) and `lowband compare` (lowband's own engine) on the same protocol and corpus end
within TOLERANCE of each other. The corpus is the Python standard library's source (on every
machine; nothing downloaded, nothing vendored). Sampling and initialization differ between the
two, so this is statistical agreement, as the long benchmark's."""

import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import unittest

import helpers

ROOT = pathlib.Path(__file__).resolve().parents[3]
SITES, STEPS, STRATEGY = 2, 150, "diloco@25"
TOLERANCE = 0.05


def standard_library_corpus(path, limit=2_000_000):
    with open(path, "wb") as out:
        total = 0
        for source in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            data = source.read_bytes()
            out.write(data)
            total += len(data)
            if total > limit:
                return


class Example(unittest.TestCase):
    def test_the_example_agrees_with_lowband_compare(self):
        binary = helpers.binary()
        with tempfile.TemporaryDirectory() as directory:
            corpus = os.path.join(directory, "corpus.txt")
            standard_library_corpus(corpus)
            config = str(ROOT / "configs" / "reference.toml")
            out = os.path.join(directory, "example.json")
            subprocess.run(
                [sys.executable, str(ROOT / "examples" / "torch" / "train_gpt2.py"), "--corpus", corpus,
                 "--sites", str(SITES), "--strategy", STRATEGY, "--steps", str(STEPS), "--seed", "0",
                 "--config", config, "--json", out, "--directory", os.path.join(directory, "run")],
                check=True, capture_output=True, env=dict(os.environ, LOWBAND_BIN=binary), timeout=600,
            )
            with open(out) as file:
                example = json.load(file)
            summary = os.path.join(directory, "compare.json")
            subprocess.run(
                [binary, "compare", "--config", config, "--corpus", corpus, "--sites", str(SITES),
                 "--strategies", STRATEGY, "--steps", str(STEPS), "--seed", "0",
                 "--runs-dir", directory, "--json", summary],
                check=True, capture_output=True, timeout=600,
            )
            with open(summary) as file:
                compare = json.load(file)["strategies"][0]
        self.assertEqual(example["rounds"], compare["rounds"])
        difference = example["final_val_loss"] / compare["final_val_loss"] - 1
        print(f"\nexample {example['final_val_loss']:.4f}, compare {compare['final_val_loss']:.4f}: {difference:+.2%}")
        self.assertLess(abs(difference), TOLERANCE)


if __name__ == "__main__":
    unittest.main()
