"""The stream processor stage (``f2pipe processor``): raw frames in, readings out.

See :mod:`.runner`.
"""
