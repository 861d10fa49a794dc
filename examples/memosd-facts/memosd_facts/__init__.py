"""memosd-facts: an example memosd plugin (structured facts with validity).

See :mod:`memosd_facts.plugin` for the hooks; docs/plugins.md for the tutorial.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
