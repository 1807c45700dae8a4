"""`fastcore-train demo` and `fastcore-train lr-find` end to end, on small budgets."""
import dataclasses
import pickle

import numpy as np
import pytest
import torch

from fastcore_train import cli, demo

pytest.importorskip("sklearn.datasets")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small are dominated by thread synchronisation; one thread is as fast and
    # immune to other processes competing for the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(len(PNG_MAGIC))
    assert head == PNG_MAGIC, f"{path} is not a PNG"


def _assert_plots(out):
    for name in ("lr_find.png", "schedule.png", "curves.png"):
        _assert_png(out / name)


def test_demo_digits_end_to_end(tmp_path, capsys):
    res = demo.run_demo(data="digits", epochs=2, progress=False, out=str(tmp_path))

    _assert_plots(tmp_path)
    assert sorted(res["plots"]) == sorted(str(tmp_path / n) for n in
                                          ("lr_find.png", "schedule.png", "curves.png"))
    lines = res["table"].splitlines()
    assert lines[0].startswith("| run | epochs to 97%")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["baseline", "fast recipe"]
    assert res["table"] in capsys.readouterr().out

    base, recipe = res["baseline"], res["recipe"]
    assert len(base.history) == 2 and 1 <= len(recipe.history) <= 2
    assert base.setup_s == 0.0 and recipe.setup_s > 0.0  # the LR finder's time is counted
    assert recipe.max_lr == res["finder"].suggestion
    (_, ytr), _, _ = demo.load_data("digits")
    steps_per_epoch = len(ytr) // demo.DEFAULTS["digits"]["recipe_batch"]
    assert len(recipe.lrs) == steps_per_epoch * len(recipe.history)  # one lr per step
    assert all(0.0 <= r.final_accuracy <= 1.0 for r in (base, recipe))


def _write_cifar(root, n_per_file=40, seed=0):
    """A tiny CIFAR-10 in the python-pickle format: data_batch_1..5 and test_batch."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, n_per_file)
        # Class-dependent mean colour so that there is something to learn.
        data = rng.integers(0, 128, (n_per_file, 3072)) + (labels[:, None] * 12)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                 b"data": data.astype(np.uint8), b"filenames": [b"x.png"] * n_per_file}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_load_cifar10_format(tmp_path):
    _write_cifar(tmp_path)
    (xtr, ytr), (xva, yva), num_classes = demo.load_data("cifar10", str(tmp_path))
    assert xtr.shape == (200, 3, 32, 32) and xva.shape == (40, 3, 32, 32)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert num_classes == 10
    # The model's first layer normalises with the training set's per-channel statistics.
    mean, std = demo.normalization("cifar10", xtr)
    for fused in (False, True):
        z = demo.Normalize(mean, std, fused)(xtr)
        assert z.dtype == torch.float32
        assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
        assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_digits_are_uint8_and_normalise_as_before():
    """Digits stay 0..16 ink levels in uint8; (v - 8) / 8 is exactly the float normalisation
    the demo used before, (v/16 - 0.5) / 0.5, by both paths."""
    (xtr, _), _, _ = demo.load_data("digits")
    assert xtr.dtype == torch.uint8 and int(xtr.max()) == 16
    mean, std = demo.normalization("digits", xtr)
    want = (xtr.float() / 16.0 - 0.5) / 0.5
    for fused in (False, True):
        assert torch.equal(demo.Normalize(mean, std, fused)(xtr), want)
    z = torch.randn(2, 1, 8, 8)
    assert demo.Normalize(mean, std, True)(z) is z  # normalised on the way by ft.Mixup


def test_cli_demo_cifar10(tmp_path, capsys, monkeypatch):
    root, out = tmp_path / "cifar", tmp_path / "out"
    root.mkdir()
    _write_cifar(root)
    # The plumbing is under test, not the LR finder's budget: a 10-step sweep keeps it fast.
    cfg = dict(demo.DEFAULTS["cifar10"])
    cfg["recipe"] = dataclasses.replace(cfg["recipe"], lr_find_iters=10)
    monkeypatch.setitem(demo.DEFAULTS, "cifar10", cfg)

    code = cli.main(["demo", "--data", "cifar10", "--root", str(root), "--epochs", "1",
                     "--out", str(out), "--device", "cpu", "--no-progress"])

    assert code == 0
    _assert_plots(out)
    printed = capsys.readouterr().out
    # 200 training images: fewer than the recipe's batch of 256, which then keeps its one batch.
    assert "dataset cifar10: 200 train / 40 validation images, 10 classes" in printed
    assert "| baseline |" in printed and "| fast recipe |" in printed


def test_cli_demo_cifar10_missing_files(tmp_path, capsys):
    code = cli.main(["demo", "--data", "cifar10", "--root", str(tmp_path), "--epochs", "1",
                     "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "fastcore-train demo: error: no CIFAR-10 python batches" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--data", "cifar10"], "--data cifar10 needs --root"),
    (["demo", "--target", "1.5"], "expected an accuracy in (0, 1], got '1.5'"),
    (["demo", "--epochs", "0"], "expected a positive integer, got '0'"),
    (["lr-find", "--num-iter", "x"], "expected a positive integer, got 'x'"),
    (["bench", "--device", "tpu"], "'tpu' is not a device"),
    (["bench", "--device", "meta"], "'meta': only cpu and cuda are supported"),
    (["bench", "--device", "gpu0"], "'gpu0' is not a device"),
])
def test_cli_argument_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2  # argparse's usage error, no traceback
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_device_without_cuda(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_lr_find(tmp_path, capsys):
    code = cli.main(["lr-find", "--out", str(tmp_path), "--num-iter", "20", "--device", "cpu",
                     "--no-progress"])

    assert code == 0
    _assert_png(tmp_path / "lr_find.png")
    printed = capsys.readouterr().out
    assert "LR range test:" in printed and "valley" in printed


# ---- untrusted data files and unwritable outputs ------------------------------------------------

class _RunsCode:
    """A pickle payload that runs a shell command when unpickled (what a hostile file does)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os
        return os.system, (self.cmd,)


def test_hostile_cifar_batch_runs_no_code(tmp_path, capsys):
    _write_cifar(tmp_path)
    marker = tmp_path / "PWNED"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsCode(f"touch {marker}"), b"labels": []}, f, protocol=2)
    code = cli.main(["demo", "--data", "cifar10", "--root", str(tmp_path), "--epochs", "1",
                     "--out", str(tmp_path / "out"), "--no-progress"])
    assert not marker.exists(), "unpickling ran the file's code"
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastcore-train demo: error: data_batch_1 is not a CIFAR-10 python batch "
                   "(UnpicklingError: it refers to posix.system, which a CIFAR-10 batch never "
                   "does)"]


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"not a pickle at all" * 10])
def test_corrupt_cifar_batch_is_one_line(tmp_path, capsys, content):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(content)
    code = cli.main(["demo", "--data", "cifar10", "--root", str(tmp_path), "--epochs", "1",
                     "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "fastcore-train demo: error: test_batch is not a CIFAR-10 python batch")


def test_cifar_batch_of_the_wrong_shape_is_refused(tmp_path):
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 python batch"):
        demo.load_data("cifar10", str(tmp_path))


@pytest.mark.parametrize("kind", ["file", "under_file", "sys"])
def test_unwritable_out_is_a_usage_error(tmp_path, capsys, kind):
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("x")
    elif kind == "under_file":
        (tmp_path / "taken").write_text("x")
        out = tmp_path / "taken" / "plots"
    else:
        out = "/sys/fastcore_train_plots"
    with pytest.raises(SystemExit) as info:
        cli.main(["lr-find", "--out", str(out), "--num-iter", "5", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out '{out}'" in err and "Traceback" not in err
