"""Typed errors of the snapshot merge (all :class:`~dmuserd.snapshot.cow.CowError`)."""

from __future__ import annotations

from dmuserd.snapshot._cow_format import CowError


class MergeError(CowError):
    """A COW file cannot be merged into its base, or a merge went wrong."""


class MergeUnsafeError(MergeError):
    """The COW file cannot be merged in place safely; refused before the base
    was touched."""


class MergeResumeError(MergeError):
    """An interrupted merge cannot be resumed: its header or scratch window is damaged."""


class MergeVerifyError(MergeError):
    """What the merge wrote to the base does not read back the same."""


class MergeBusyError(MergeError):
    """Another merge of the same COW file is running."""


class MergeStateError(MergeError):
    """A merge control request that does not fit the merge's state (start twice, ...)."""
