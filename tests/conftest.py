"""Test-wide settings."""

import os

# The build CLI must start its own loopback Ray in tests, never join a cluster from the environment.
os.environ.pop("RAY_ADDRESS", None)
