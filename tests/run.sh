#!/usr/bin/env bash
# Installs what the tests need, then runs them. The tests themselves start a real
# Apache Kafka broker (jars resolved from Maven Central by tests/infra/pom.xml, cached
# in ~/.m2 and ~/.cache/restconsumer) and a real redis-server, and stop them after.
# ruff, mypy and import-linter check the code first. Extra arguments go to pytest;
# pytest's closing line is the last thing printed.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
# the dashboard's tests drive Debian's Chromium through its chromedriver (nothing downloaded)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore '.[test]'
rm -rf build
python3 -m ruff check --quiet .
python3 -m mypy   # with the mypy-zope plugin, configured in pyproject.toml
lint-imports --no-cache   # imports go only down (the layers in pyproject.toml)
exec python3 -m pytest "$@"
