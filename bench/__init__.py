"""dmuserd's benchmark harness (``make bench``, ``make bench-quick``)."""
