"""``python -m memosd.cli``: the same as the ``memctl`` console script."""

from memosd.cli.main import main

main()
