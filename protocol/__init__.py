"""dm-user protocol (placeholder until written)."""
