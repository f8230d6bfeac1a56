"""CLI: `python -m ovd_jax.convert --format FORMAT --input PATH --output DIR [--model NAME]`.

Converts a PyTorch checkpoint into our format (config.json + variables.msgpack). Each format maps
to one function `(input, output, model) -> output_dir`; other modules add theirs to CONVERTERS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from ovd_jax.convert import common
from ovd_jax.convert.clip import convert_clip
from ovd_jax.convert.common import save_checkpoint


def _clip(fmt: str) -> Callable[[str, str, str | None], str]:
    return lambda inp, out, model: convert_clip(inp, out, fmt, model=model)


def _bert(inp: str, out: str, model: str | None) -> str:
    """HF BERT folder / GLIP .pth language backbone -> our format ({"type": "bert", ...})."""
    from ovd_jax.convert.bert import load_bert  # noqa: PLC0415

    bert, variables = load_bert(inp)
    config = {"type": "bert", **dataclasses.asdict(bert.config)}
    return save_checkpoint(out, config, variables)


def _swin(inp: str, out: str, model: str | None) -> str:
    """torchvision / Microsoft / GLIP Swin state dict -> our format; --model picks the
    architecture (swin_t, swin_s, swin_b; default swin_t)."""
    from ovd_jax.convert.swin import load_swin  # noqa: PLC0415

    arch = model or "swin_t"
    _, variables = load_swin(inp, arch)
    return save_checkpoint(out, {"type": "swin", "arch": arch}, variables)


def _glip(inp: str, out: str, model: str | None) -> str:
    """Official GLIP .pth -> the whole GLIP detector in our format; --model is the
    configs/glip.py variant the weights are for (glip_t, glip_l; default: by the Swin width)."""
    from ovd_jax.convert.glip import convert_glip  # noqa: PLC0415

    return convert_glip(inp, out, model)


CONVERTERS: dict[str, Callable[[str, str, str | None], str]] = {
    "openai_clip": _clip("openai_clip"),
    "hf_clip": _clip("hf_clip"),
    "open_clip": _clip("open_clip"),
    "regionclip": _clip("regionclip"),
    "hf_bert": _bert,
    "swin": _swin,
    "glip": _glip,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovd_jax.convert", description=__doc__)
    parser.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    parser.add_argument("--input", required=True, help="checkpoint file or folder")
    parser.add_argument("--output", required=True, help="output folder (our format)")
    parser.add_argument("--model", default=None,
                        help="model name, e.g. an open_clip name such as RN50-quickgelu")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="UNSAFE: fully unpickle a checkpoint that holds more than tensors "
                             "(runs any code the file holds); only for files you trust")
    args = parser.parse_args(argv)
    previous = common.ALLOW_PICKLE
    common.ALLOW_PICKLE = args.allow_pickle
    try:
        out = CONVERTERS[args.format](args.input, args.output, args.model)
    except ValueError as e:  # bad input: one clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        common.ALLOW_PICKLE = previous
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
