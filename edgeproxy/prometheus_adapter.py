"""Everything edgeproxy takes from prometheus_client beyond its public API, in one place.

prometheus_client chooses how a metric keeps its value once, when
``prometheus_client.values`` is imported: in memory, or in a per-process mmap
file when ``PROMETHEUS_MULTIPROC_DIR`` is set at that moment. ``serve`` makes
that directory fresh for each run, after the import (``metrics.make_run_dir``),
so the choice is made again here by setting ``values.ValueClass``, the module
global every metric reads when it is created. ``_check()`` verifies at import
time that the global and ``MultiProcessValue`` still exist, so a
prometheus_client upgrade that renames them fails at start-up with the name.
Written against prometheus_client 0.26 (the locked version).
Must not import: anything of ours.
"""

from __future__ import annotations

from prometheus_client import values

__all__ = ["use_multiprocess_values"]


def _check() -> None:
    missing = [name for name in ("ValueClass", "MultiProcessValue") if not hasattr(values, name)]
    if missing:
        raise ImportError(
            f"prometheus_client {getattr(values, '__name__', '')} lacks {', '.join(missing)}: edgeproxy's "
            "multiprocess metrics rely on them (edgeproxy/prometheus_adapter.py); install the locked version")


_check()


def use_multiprocess_values() -> None:
    """Metrics created from now on in this process keep their values in mmap files
    under ``PROMETHEUS_MULTIPROC_DIR`` (which the caller has set)."""
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
