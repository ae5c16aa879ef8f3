"""The llamafuse shard format: config, tensor names, per-rank layout, manifest, file I/O.

Both the converter and the runtime import from here; nothing else defines a tensor name.
"""
from .config import ModelConfig
from .errors import LlamafuseError
from .layout import WEIGHT_DTYPES, RankLayout, TensorSpec, check_tp, rank_tensor_specs
from .manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, RankFile, load_manifest

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "LlamafuseError", "Manifest", "ModelConfig", "RankFile",
    "RankLayout", "TensorSpec", "WEIGHT_DTYPES", "check_tp", "load_manifest", "rank_tensor_specs",
]
