"""mppproxy: a transparent, lockstep SMTP filtering proxy on Twisted.

The metadata and dependencies live in pyproject.toml (PEP 621); this file keeps
what needs code: the packages, with the twisted.plugins drop-in and the
templates installed inside the package."""
from setuptools import find_packages, setup

setup(
    # twisted.plugins is listed so the dropin reaches site-packages
    # (Twisted docs/core/howto/tap.rst); it has no __init__.py on purpose.
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins", "mppproxy.templates"],
    # The Jinja2 templates live at the top of the repository (templates/) and
    # are installed inside the package as mppproxy/templates.
    package_dir={"mppproxy.templates": "templates"},
    # The archive store's Alembic revisions are packages (find_packages
    # takes them); their template is not Python.
    package_data={"twisted": ["plugins/mppproxy_plugin.py"],
                  "mppproxy.templates": ["*/*.txt", "*/*.html", "*/*.j2", "*/*.css"],
                  "mppproxy.store.migrations": ["script.py.mako"],
                  # The Public Suffix List for DMARC (mppproxy/data/README.md).
                  "mppproxy": ["data/public_suffix_list.dat", "data/README.md"]},
    include_package_data=True,
)
