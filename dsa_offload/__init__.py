"""Bulk data moves offloaded to Intel DSA, with a device emulator and a CPU engine."""
