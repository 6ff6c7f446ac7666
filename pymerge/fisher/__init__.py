"""Diagonal Fisher estimation (full and mask Fisher) and the Fisher file format."""
from pymerge.fisher.store import Fisher, load, save, structure_fingerprint, weights_fingerprint  # noqa: F401
from pymerge.fisher.estimate import estimate  # noqa: F401,E402
