"""In-process federated simulation with real ORT training per device (no broker)."""
