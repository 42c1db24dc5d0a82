#!/usr/bin/env bash
# install-test-tools.sh -- command-line tools the tests drive that no service script brings:
# crontab (package cron), for `orchd install-cron`'s test. The cron daemon is not started: the
# test checks the table and runs the line itself. Idempotent; needs root to install.
set -euo pipefail
if ! command -v crontab >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "crontab missing; install the cron package as root" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cron >/dev/null 2>&1 || {
    apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cron >/dev/null; }
fi
echo "crontab: $(command -v crontab)"
