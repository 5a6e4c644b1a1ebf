"""Drafters: one protocol (``base.Drafter``), one module per method, one registry (``registry``).

``registry`` lists every kind and builds it; this package imports nothing itself, so reading the
registry's names stays cheap.
"""
