"""Kept for tools that still call `python setup.py ...`: the metadata, extras and console commands are in
pyproject.toml (PEP 621)."""

from setuptools import setup

setup()
