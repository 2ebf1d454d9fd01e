"""Test-wide settings.

Tests run on 8 fake CPU devices so that sharded code paths are exercised; the
flag must be set before JAX initialises its backend, hence at import time here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
