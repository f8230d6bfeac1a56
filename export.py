"""Export a trained detector to a self-contained artifact folder.

    python export.py --workdir runs/demo --out runs/demo_artifact
    python export.py --checkpoint runs/demo/checkpoints/800 --out art --platforms cpu

The artifact (docs/export.md) runs with jax, numpy, safetensors, Pillow and the tokenizer:
see detect.py.
"""

from ovd_jax.export.cli import export_main

if __name__ == "__main__":
    export_main()
