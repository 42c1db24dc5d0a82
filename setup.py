"""The one compiled part of orchd, logparse.py's metric recogniser (orchestrator/_linescan.c).

Optional: where no C compiler is at hand the build goes on without it, and the parser uses its
regexes (the same results, ~3.5x slower on a log's catch-up). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("orchestrator._linescan", ["orchestrator/_linescan.c"], optional=True,
                             extra_compile_args=["-O2"])])
