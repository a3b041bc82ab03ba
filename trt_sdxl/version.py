"""The package version, recorded in manifests and in every image's parameters."""

__version__ = "0.1.0"
