"""The library version (a leaf: submodules import it from here, not from the package)."""

__version__ = "0.1.0"
