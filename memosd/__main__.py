"""``python -m memosd``: the same as the ``memosd`` console script."""

from __future__ import annotations

from memosd.daemon import main

raise SystemExit(main())
