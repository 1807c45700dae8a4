"""The fuzz harness (tests/fuzz_harness.py): ~1100 bad or unusual inputs per backend against
torch's own ops, in a subprocess so that a crash fails this test and names its case."""
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fuzz_harness  # noqa: E402


def test_no_mismatch_with_torch():
    # the package of this checkout, not whichever one the interpreter would find on its own
    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_harness.py")],
                       capture_output=True, text=True, timeout=600, cwd=root, env=env)
    last = r.stderr.strip().splitlines()[-1:] or ["<none>"]
    assert r.returncode == 0, f"the harness died (exit {r.returncode}) at case {last[0]}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    print("fuzz cases per family:", counts)
    assert set(counts) == set(fuzz_harness.FAMILIES)
    assert sum(counts.values()) >= 1000
    bad = result["mismatches"]
    assert not bad, f"{len(bad)} mismatches, e.g. " + "; ".join(
        f"{m['case']} [{m['backend']}]: {m['problem']}" for m in bad[:5])


# ---- the harness can fail -------------------------------------------------------------------------

def test_harness_sees_a_wrong_value():
    truth = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert fuzz_harness.same_values(torch.tensor([1.0, 2.0]), truth, None, torch.float32) is None
    assert "value" in fuzz_harness.same_values(torch.tensor([1.0, 2.1]), truth, None,
                                               torch.float32)
    assert "NaN" in fuzz_harness.same_values(torch.tensor([1.0, float("nan")]), truth, None,
                                             torch.float32)


def test_harness_sees_wrong_outcomes():
    cmp = fuzz_harness.Harness._compare
    ok = (torch.ones(2),)
    assert "ours returns" in cmp("f", "", "raise", ValueError("x"), "ok", ok, None, torch.float32)
    assert "ours raises" in cmp("f", "", "ok", ok, "raise", ValueError("x"), None, torch.float32)
    assert "ours TypeError" in cmp("f", "", "raise", ValueError("x"), "raise", TypeError("y"),
                                   None, torch.float32)
    assert "unclear" in cmp("f", "", "raise", ValueError("x"), "raise", AttributeError("y"),
                            None, torch.float32)
    # a documented difference is not a mismatch, and must not compute either
    assert cmp("f", ["mixup.lam_outside"], "ok", ok, "raise", ValueError("y"), None,
               torch.float32) is None
    assert "should refuse" in cmp("f", ["mixup.lam_outside"], "ok", ok, "ok", ok, None,
                                  torch.float32)
