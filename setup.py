"""fedge: on-device federated learning for edge and IoT fleets.

All metadata lives in pyproject.toml (PEP 621); this shim keeps `setup.py` at the
top level for tools and firmware build systems that still call it.
"""

from setuptools import setup

setup()
