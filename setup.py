"""The one thing pyproject.toml cannot say without an experimental table: layerscope's C part.

core/_directc.c is the direct way's hot path (see core/direct.py). It is optional: a build
without a C compiler leaves it out, and the Python in core/direct.py does the same work more
slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("layerscope.core._directc", ["core/_directc.c"], optional=True)])
