"""The package version, at the bottom so that any layer can record it."""
__version__ = "0.1.0"
