"""The fedge wire protocol: topics, tensor encoding, sealed and signed messages, receipts, validation, chunking.

See docs/protocol.md for the byte layouts and the crypto construction.
"""
