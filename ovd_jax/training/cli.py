"""Flag parsing for the entry points: config-override mistakes become one clear message."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown `--config.x.y=...` key reported as one line + exit 2."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        sys.stderr.write(
            f"error: unknown config key {e} in {' '.join(overrides) or 'the --config overrides'}; "
            "check the spelling against the recipe file (python -c \"from configs import demo; "
            "print(demo.get_config(''))\" lists every key).\n"
        )
        sys.exit(2)
    except flags.Error as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
