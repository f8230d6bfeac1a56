"""Detect free-text queries in your own images.

    python detect.py --artifact runs/demo_artifact --image photos/ --queries "red circle, blue \
        square" --out out/
    python detect.py --workdir runs/demo --image photo.png --queries @queries.txt --out out/

Prints a table, writes out/detections.json (COCO results; out/index.json maps image and
category ids to file names and queries) and annotated PNGs. With --artifact, flax is not needed.
"""

from ovd_jax.export.cli import detect_main

if __name__ == "__main__":
    detect_main()
