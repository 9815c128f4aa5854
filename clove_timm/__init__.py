"""CLoVE (Contextualized Local Visual Embeddings) for timm backbones.

Importing the package registers the CLoVE pretrained tags with timm (``resnet50.clove_in1k`` and friends, see
:mod:`clove_timm.registry`); it has no other side effect.
"""

__version__ = "0.1.0"

import warnings

from clove_timm.registry import TimmRegistryError, register_pretrained_tags

try:
    register_pretrained_tags()
except TimmRegistryError as _error:
    # The rest of the package works without the tags; loading by tag name will fail with timm's own
    # "Invalid pretrained tag" error, and this warning says why.
    warnings.warn(str(_error), RuntimeWarning, stacklevel=2)
