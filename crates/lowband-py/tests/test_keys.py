"""The package's node keys are the `lowband` binary's: a key either makes, the other reads, with
the same public key; an existing key is kept unless forced; a file that is not a key is an error
naming it. `LOWBAND_BIN` names the binary (CI: the one `cargo test` built)."""

import os
import subprocess
import tempfile
import unittest

import lowband


def binary():
    return os.environ.get("LOWBAND_BIN", "target/debug/lowband")


class Keys(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def path(self, name):
        return os.path.join(self.dir, name)

    def test_a_key_the_binary_makes_reads_back_with_its_public_key(self):
        out = subprocess.run(
            [binary(), "keygen", "--out", self.path("b.key")],
            check=True, capture_output=True, text=True,
        ).stdout
        printed = out.strip().removeprefix("public ")
        self.assertEqual(lowband.public_key(self.path("b.key")), printed)

    def test_a_key_the_package_makes_is_kept_unless_forced(self):
        first = lowband.keygen(self.path("p.key"))
        self.assertEqual(len(first), 64)
        self.assertEqual(lowband.public_key(self.path("p.key")), first)
        self.assertEqual(os.stat(self.path("p.key")).st_mode & 0o777, 0o600)
        with self.assertRaisesRegex(FileExistsError, "p.key exists"):
            lowband.keygen(self.path("p.key"))
        second = lowband.keygen(self.path("p.key"), force=True)
        self.assertNotEqual(first, second)

    def test_a_file_that_is_not_a_key_is_an_error_naming_it(self):
        with open(self.path("junk.key"), "w") as f:
            f.write("not a key")
        with self.assertRaisesRegex(ValueError, "junk.key"):
            lowband.public_key(self.path("junk.key"))

    def test_the_version_is_the_crates(self):
        self.assertEqual(lowband.__version__, "0.1.0")


if __name__ == "__main__":
    unittest.main()
