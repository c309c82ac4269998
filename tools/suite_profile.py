"""Where the test suite's time goes: a pytest plugin that charges JAX's tracing, lowering and
XLA compile time (jax.monitoring events) and persistent-cache hits to the test that caused
them, and prints the tests and modules that spend the most.

    python -m pytest -q -p tools.suite_profile [--profile-out suite_profile.json] [tests ...]

The suite is compile-bound on small CPUs (tiny goldens run in microseconds; each distinct
program takes 0.1-5 s to compile), so this is the table to read before making CI faster.
"""

from __future__ import annotations

import collections
import json
import time

import pytest

EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class SuiteProfile:
    def __init__(self, out: str | None):
        self.out = out
        self.current = "<collection>"
        self.tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        import jax.monitoring as monitoring

        monitoring.register_event_duration_secs_listener(self._duration)
        monitoring.register_event_listener(self._event)

    def _duration(self, event: str, seconds: float, **_):
        if event in EVENTS:
            row = self.tests[self.current]
            row[EVENTS[event]] += seconds
            if event.endswith("backend_compile_duration"):
                row["compiles"] += 1

    def _event(self, event: str, **_):
        if event == CACHE_HIT:
            self.tests[self.current]["cache_hits"] += 1

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.tests[item.nodeid]["wall_s"] += time.perf_counter() - start
            self.current = "<between tests>"

    def pytest_terminal_summary(self, terminalreporter):
        modules: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for nodeid, row in self.tests.items():
            modules[nodeid.split("::")[0]].update(row)
        total = collections.Counter()
        for row in modules.values():
            total.update(row)
        write = terminalreporter.write_line
        cols = ("wall_s", "compile_s", "lower_s", "trace_s", "compiles", "cache_hits")

        def table(title, rows, n):
            write(f"\n{title}")
            write(f"{'':70s} " + " ".join(f"{c:>10s}" for c in cols))
            for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["wall_s"])[:n]:
                write(f"{name[-70:]:70s} " + " ".join(f"{row[c]:10.1f}" if c.endswith("_s") else f"{row[c]:10d}"
                                                      for c in cols))

        table("suite profile: modules by wall time", modules, 40)
        table("suite profile: tests by wall time", self.tests, 40)
        write("total: " + ", ".join(f"{c} {total[c]:.1f}" for c in cols))
        if self.out:
            with open(self.out, "w") as f:
                json.dump({k: dict(v) for k, v in self.tests.items()}, f, indent=1)


def pytest_addoption(parser):
    parser.addoption("--profile-out", default=None, help="write the per-test profile as JSON here")


def pytest_configure(config):
    config.pluginmanager.register(SuiteProfile(config.getoption("--profile-out")), "refjax-suite-profile")
