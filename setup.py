"""Packaging of restconsumer; ``twisted.plugins`` is listed so twistd finds the plugin."""

from setuptools import find_packages, setup

setup(
    name="restconsumer",
    version="0.1.0",
    description="Kafka messages turned into REST requests, as declared by jobs kept in Redis",
    python_requires=">=3.11",
    packages=[*find_packages(include=["restconsumer", "restconsumer.*"]), "twisted.plugins"],
    package_data={"restconsumer": ["api/openapi.json", "api/ui/*.html", "api/ui/*.js", "api/ui/*.css"]},
    entry_points={"console_scripts": ["restconsumer = restconsumer.ops.cli:main"]},
    install_requires=[
        # Below the next release not yet tested (calendar versions): restconsumer.delivery.agent
        # uses two private methods of Agent, pinned by tests/test_pinned.py.
        "twisted[tls]>=24.7,<26.11",
        "klein>=24.8",
        "treq>=24.9",
        "txredisapi>=1.6,<1.7",  # its factories' public fields (restconsumer.control.redis)
        "confluent-kafka>=2.6",
        "jsonpath-ng>=1.6",
        "fastavro>=1.9",
        "cryptography>=42",
        "prometheus-client>=0.20",
        "jsonschema>=4.18",  # the job model is checked against openapi.json's JobDefinition
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "confluent-kafka[schemaregistry]>=2.6",  # its serializers make the registry frames of tests
            "packaging>=23",  # tests/test_pinned.py reads setup.py's bounds
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "hypothesis>=6",
            "redis>=5",
            "ruff>=0.6",
            "schemathesis>=4.0",
            "selenium>=4.20",
            "standardwebhooks>=1.0",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "import-linter>=2.0",
        ],
    },
)
