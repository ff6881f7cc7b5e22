#!/usr/bin/env bash
# apt-install.sh PKG...: install Debian packages non-interactively (root only).
# Waits up to 900 s for another apt/dpkg run instead of failing on the lock, and
# refreshes the package lists once if the install fails because they are missing
# or stale. Where /usr/sbin/policy-rc.d exits 101 the packages' services stay
# stopped; elsewhere the caller stops what it does not want (see .ci/run).
set -u
export DEBIAN_FRONTEND=noninteractive
lock=(-o DPkg::Lock::Timeout=900)
inst=(-y -q --no-install-recommends)
apt-get "${lock[@]}" install "${inst[@]}" "$@" && exit 0
apt-get "${lock[@]}" update -q && apt-get "${lock[@]}" install "${inst[@]}" "$@"
