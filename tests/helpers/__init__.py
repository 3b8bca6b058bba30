"""Helpers shared by the tests (no tests here): tiny models, leak checks, the HTTP server
fixtures, attention cases. Test modules import them as `helpers.<module>`: pytest puts
tests/ on sys.path (pyproject's `pythonpath`), for tests/gpu/ as for tests/."""
