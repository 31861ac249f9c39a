"""Fixtures of the lifecycle tests (see shapes.py)."""

import os

import pytest


@pytest.fixture
def daemon(start_daemon):
    """A running daemon writing under tmp_path/logs."""
    made = start_daemon()
    os.makedirs(made.log_dir, exist_ok=True)
    return made
