"""The tier scheduler: durable background jobs that move memory between tiers.

This package is intentionally empty until the scheduler lands (see issue
"Plugin scheduler"); it exists so the import name ``memosd.scheduler`` is
reserved by the package layout.
"""
