"""One build step that pyproject.toml cannot say: the wheel's top-level package ``instruments`` (the
old import name, deprecated, kept for one release) holds only its ``__init__.py``, which hands over to
``cockpit_lite.instruments`` (instruments/_old_name.py). The instruments themselves ship once, under
``cockpit_lite/instruments/`` (package discovery follows the ``cockpit_lite/instruments`` symlink).
Everything else is configured in pyproject.toml."""

from setuptools import setup
from setuptools.command.build_py import build_py

OLD_NAME = "instruments"


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == OLD_NAME:
            modules = [m for m in modules if m[1] == "__init__"]
        return modules


setup(cmdclass={"build_py": BuildPy})
