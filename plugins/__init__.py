"""Plugin hook specifications and the built-in memory forms.

This package is intentionally empty until the plugin API lands (see issue
"Plugin API"); it exists so the import name ``memosd.plugins`` is reserved by
the package layout.
"""
