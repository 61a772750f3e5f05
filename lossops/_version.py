"""The package version: lossops.__version__, show_config's first line and the wheel's version (pyproject.toml)."""
__version__ = "0.1.0"
