"""The fedge wire protocol: topics, tensor encoding, sealed envelopes, validation."""
