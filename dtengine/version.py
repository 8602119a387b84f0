"""The package version, in a leaf module every part may import (setup.py reads it too)."""

__version__ = "0.1.0"
