"""The amft_vlm tests use the suite's fixtures in ``tests/conftest.py``; `MAX_PIXELS` is re-exported for
the tests that import it from here."""

from tests.conftest import MAX_PIXELS

__all__ = ["MAX_PIXELS"]
