"""Shared test utilities: smoke configs on a per-session synthetic dataset."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def smoke_config(data_root: str, recipe: str = "demo", arg: str = "smoke"):
    """The `smoke` variant of a recipe with its synthetic data under `data_root`."""
    import importlib

    module = importlib.import_module(f"configs.{recipe}")
    config = module.get_config(arg)
    config.data.root = data_root
    return config
