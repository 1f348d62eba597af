"""The package version, apart so runtime/cache.py can key on it without importing attndsl."""

__version__ = "0.1.0"
