"""Test-wide environment: quiet Ray, token authentication on (docs/ray.md §2: Ray 2.60 listens on
every interface, so the token is what keeps the test clusters to this machine's tests)."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
