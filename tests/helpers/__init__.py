"""Helpers shared by tests in several folders.

``tests/`` is on pytest's ``pythonpath`` (pyproject.toml), so every test imports them the same
way wherever it lives: ``from helpers.servers import serve``.
"""
