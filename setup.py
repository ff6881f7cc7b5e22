"""mppproxy: a transparent, lockstep SMTP filtering proxy on Twisted."""
from setuptools import find_packages, setup

setup(
    name="mppproxy",
    version="0.1.0",
    description="Transparent SMTP filtering proxy (lockstep relay, policy, scanning) on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted.plugins is listed so the dropin reaches site-packages
    # (Twisted docs/core/howto/tap.rst); it has no __init__.py on purpose.
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins", "mppproxy.templates"],
    # The Jinja2 templates live at the top of the repository (templates/) and
    # are installed inside the package as mppproxy/templates.
    package_dir={"mppproxy.templates": "templates"},
    package_data={"twisted": ["plugins/mppproxy_plugin.py"],
                  "mppproxy.templates": ["*/*.txt", "*/*.html", "*/*.j2"]},
    include_package_data=True,
    install_requires=[
        "twisted>=23.10",
        "pyopenssl>=23.0",
        "service_identity>=21.1",
        "cryptography>=41",
        "dnspython>=2.4",
        # IDNA 2008 for comparing internationalised relay domains
        "idna>=3.4",
        "sqlalchemy>=2.0",
        "pymysql>=1.1",
        "jinja2>=3.1",
        # country rules of the header filter (scan/scanners/headers.py) read
        # MaxMind DB files (GeoLite2/GeoIP2 Country, DB-IP lite); a C reader
        # with a pure-Python fallback, no network at run time
        "maxminddb>=2.0",
    ],
    extras_require={
        "test": ["pytest>=7", "trustme>=1.1", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["mppproxy = mppproxy.cli:main"]},
)
