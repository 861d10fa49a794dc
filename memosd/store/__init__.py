"""placeholder package init; replaced by its module docstring"""
