"""The package version (read by pyproject.toml, the runtime's state files and ``--version``)."""

__version__ = "0.2.0"
