"""Reading weights runs no code from the file (torch pickles and TorchScript archives)."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from ovd_jax.convert import common, safe_load
from ovd_jax.convert.__main__ import main as convert_main


class _Evil:
    """Unpickling this creates `marker` (a stand-in for any code an attacker could run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pth(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(str(marker))}, str(path))
    return str(path), marker


def test_pickle_that_runs_code_is_refused(tmp_path):
    path, marker = _evil_pth(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)evil\.pth.*refuses.*--allow_pickle") as info:
        common.read_state_dict(path)
    assert "system" in str(info.value)  # names the refused global
    assert not marker.exists()
    # The CLI reports it in one line, exit code 2, and nothing ran.
    assert convert_main(["--format", "openai_clip", "--input", path,
                         "--output", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_allow_pickle_is_explicit_and_warns(tmp_path):
    path, marker = _evil_pth(tmp_path)
    with pytest.warns(UserWarning, match="allow_pickle"):
        sd = common.read_state_dict(path, allow_pickle=True)
    assert marker.exists()  # the opt-in really is a full unpickle
    assert list(sd) == ["w"]


def test_detectron2_style_checkpoint_with_numpy(tmp_path, rng):
    """{"model": {name: np.ndarray | tensor}, "__author__": str, "iteration": int} loads."""
    w = rng.standard_normal((3, 2)).astype(np.float32)
    b = torch.from_numpy(rng.standard_normal(4).astype(np.float32)).half()
    path = tmp_path / "d2.pth"
    torch.save({"model": {"w": w, "b": b, "n": np.int64(3)}, "__author__": "someone",
                "iteration": 7}, str(path))
    sd = common.read_state_dict(str(path))
    np.testing.assert_array_equal(sd["w"], w)
    np.testing.assert_array_equal(sd["b"], b.float().numpy())
    assert sd["b"].dtype == np.float32


def _script_archive(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
            self.p = torch.nn.Parameter(torch.randn(4).half())
            self.q = torch.nn.Parameter(torch.randn(2, 3).bfloat16())
            self.register_buffer("b", torch.arange(6).reshape(2, 3).t())  # non-contiguous

        def forward(self, x):
            return self.seq(x) + self.b.sum()

    module = torch.jit.script(M())
    path = tmp_path / "m.pt"
    torch.jit.save(module, str(path))
    return module, str(path)


def test_torchscript_tensors_read_without_jit(tmp_path, monkeypatch):
    module, path = _script_archive(tmp_path)

    def no_jit(*a, **k):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    sd = common.read_state_dict(path)
    ref = module.state_dict()
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        expected = v.float().numpy() if v.is_floating_point() else v.numpy()
        np.testing.assert_array_equal(sd[k], expected, err_msg=k)


def test_torchscript_with_foreign_global_is_refused(tmp_path):
    """An archive whose data.pkl names os.system is refused; nothing runs."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil_script.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(_Evil(str(marker)), protocol=2))
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("m/code/__torch__.py", "")
    with pytest.raises(ValueError, match=r"(?s)system.*--allow_pickle"):
        common.read_state_dict(str(path))
    assert not marker.exists()


def test_damaged_archive_and_file(tmp_path):
    _, path = _script_archive(tmp_path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        kept = {n: z.read(n) for n in names if "/data/" not in n}
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as z:
        for n, data in kept.items():
            z.writestr(n, data)
    with pytest.raises(ValueError, match="broken.pt.*damaged"):
        safe_load.read_torchscript_tensors(str(broken))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pth"):
        common.read_state_dict(str(junk))
