"""Android snapshot COW files (v2/v3), the snapshot view, merge, OTA payloads."""
