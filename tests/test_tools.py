"""The benchmark tools' report writing (tools/bench.py): each tool rewrites only its own
section of BENCHMARKS.md, so a CPU, GPU and full-size run can land in one file."""

from __future__ import annotations

import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench  # noqa: E402


def test_replace_section_keeps_the_other_sections(tmp_path):
    path = str(tmp_path / "BENCHMARKS.md")
    bench.replace_section(path, "# Benchmarks\n\ncpu 1\n## GPT-2\nrow\n")
    bench.replace_section(path, "# Full-size checkpoints\n\nfull 1\n")
    bench.replace_section(path, "# Benchmarks (GPU)\n\ngpu 1\n")
    bench.replace_section(path, "# Benchmarks\n\ncpu 2\n")  # the first section, replaced
    bench.replace_section(path, "# Full-size checkpoints\n\nfull 2\n## AFM\n")  # a middle one
    assert open(path).read() == ("# Benchmarks\n\ncpu 2\n\n# Full-size checkpoints\n\nfull 2\n## AFM\n\n"
                                 "# Benchmarks (GPU)\n\ngpu 1\n")
    assert not [f for f in os.listdir(tmp_path) if f != "BENCHMARKS.md"]  # no temp file left behind


def test_the_committed_benchmarks_have_one_section_per_tool():
    titles = [line for line in open(os.path.join(ROOT, "BENCHMARKS.md")).read().splitlines() if line.startswith("# ")]
    assert titles == ["# Benchmarks", "# Benchmarks (GPU)", "# Full-size checkpoints"]
