"""Signed training bundles: manifest schema and on-device verification."""
