"""What a run prints at start-up: one line per loaded init checkpoint, no third-party noise."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from ovd_jax.convert.common import save_checkpoint
from ovd_jax.training.pretrained import merge_pretrained_towers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_init_checkpoint_line(tmp_path, rng, capsys):
    model = {"params": {
        "vision": {"w": jnp.zeros((300, 100)), "b": jnp.zeros((100,))},
        "text": {"emb": jnp.zeros((50, 8))},
        "rpn_head": {"k": jnp.zeros((3,))},
    }}
    ckpt = {"params": {
        "vision": {"w": rng.standard_normal((300, 100)), "b": rng.standard_normal(100),
                   "extra": np.zeros(2)},  # in the checkpoint, not in the model
        "text": {"emb": rng.standard_normal((50, 8))},
    }}
    path = save_checkpoint(str(tmp_path / "ck"), {"vision": {"type": "resnet"}, "text": {}}, ckpt)
    merged = merge_pretrained_towers(model, path)
    np.testing.assert_allclose(merged["params"]["vision"]["w"], ckpt["params"]["vision"]["w"],
                               rtol=1e-6)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("init_checkpoint")]
    assert len(lines) == 1, lines
    line = lines[0]
    params = 300 * 100 + 100 + 50 * 8
    for part in (path, "converted CLIP checkpoint (resnet)", "loaded 3 arrays",
                 f"({params / 1e6:.2f}M parameters)", "into vision/text", "0 missing",
                 "0 shape-mismatched", "1 checkpoint arrays in those subtrees unused",
                 "kept at initialisation: rpn_head"):
        assert part in line, (part, line)


_HIDE_TORCH = """
import importlib.util, sys
for m in ("torch", "torchvision"):
    sys.modules[m] = None  # as on a machine set up with requirements.txt only
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, p=None: None if n.split(".")[0] in ("torch",
    "torchvision") else _find(n, p)
"""


def _stderr(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    proc = subprocess.run([sys.executable, "-c", _HIDE_TORCH + code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_no_pytorch_notice_without_torch():
    # Control: transformers alone prints its notice when torch is absent; ours must not.
    assert "PyTorch was not found" in _stderr("import transformers")
    assert "PyTorch was not found" not in _stderr("import ovd_jax, transformers")
