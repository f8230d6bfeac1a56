"""ovd_jax: open-vocabulary object detection (RegionCLIP, GLIP, DetCLIPv2) in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# transformers is used for its tokenizers only; without PyTorch its import prints an advisory
# "PyTorch was not found" notice that does not concern this package. An explicit setting wins.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
