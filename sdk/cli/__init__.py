"""The ``fedge`` command line (host side)."""
