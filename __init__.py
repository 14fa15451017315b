"""dmuserd: user-space block devices in Python.

The daemon speaks Android's dm-user protocol (``dmuserd.protocol``), routes
each block request to a pluggable backend (``dmuserd.backends``) and serves
it over a real dm-user device, FUSE or NBD (``dmuserd.daemon``).

This module imports nothing heavy on purpose: nbdkit's embedded interpreter
loads ``dmuserd.protocol`` without our virtualenv's dependencies.
"""

__version__ = "0.1.0"
