"""Compatibility module: where mask Fisher's masks sit lives in pymerge.stats.masks_structure."""
from pymerge.stats.masks_structure import *  # noqa: F401,F403
from pymerge.stats.masks_structure import find_mask_structure, is_projection  # noqa: F401
