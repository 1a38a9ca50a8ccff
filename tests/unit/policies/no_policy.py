"""Forgot to define `policy`."""
x = 1
