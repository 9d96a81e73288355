"""Inventory worker: keeps stock right while orders pour in."""

__version__ = "0.1.0"
