"""Test harnesses shared by the repository's tests, benchmarks and scripts; not part of the public API.

``fuzzing`` (hostile requests, used by ``tests/test_fuzz.py`` and
``scripts/fuzz.py``) and ``crash`` (SIGKILL-and-restart rounds, used by
``tests/test_persistence_crash.py`` and ``benchmarks/crash_soak.py``) live in
the package so that all of them import them by name, from any directory,
without touching ``sys.path``, and so that mypy checks them as strictly as the
server. They are left out of the built wheel (and so of the Docker image):
they need the test extra (hypothesis) and serve only this repository.
"""
