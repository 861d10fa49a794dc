"""The memosd plugin API (docs/plugins.md).

Flat modules:

* :mod:`~memosd.plugins.hookspecs` - every hook, :data:`MEMOSD_PLUGIN_API`,
  ``hookimpl`` for plugin authors, the :class:`MemoryForm` protocol;
* :mod:`~memosd.plugins.forms` - :class:`BaseForm` and the form registry;
* :mod:`~memosd.plugins.manager` - discovery (entry-point group
  ``memosd.plugins``), allow/required lists, isolation, ``plugin_report``;
* :mod:`~memosd.plugins.builtin_forms`, :mod:`~memosd.plugins.builtin_policies`
  - the built-ins, registered through the same hooks.

A plugin needs only::

    from memosd.plugins import hookimpl
"""

from __future__ import annotations

from memosd.plugins.hookspecs import MEMOSD_PLUGIN_API, MemoryForm, hookimpl

__all__ = ["MEMOSD_PLUGIN_API", "MemoryForm", "hookimpl"]
