"""Subcommands of the daemon proper: serve, demo, status."""

from __future__ import annotations


def register(subparsers) -> None:
    pass
