#!/bin/sh
# Makes a base image for deploy/docker/Dockerfile on a host that cannot pull python:3.11-slim-bookworm
# (no registry): Debian bookworm from its package mirror with debootstrap, Python 3.11 and tini from
# Debian's packages, imported with `docker import`. Run as root (debootstrap needs it); then
#   deploy/docker/make-base.sh qpeft-base:bookworm
#   docker build --network host --build-arg PYTHON_IMAGE=qpeft-base:bookworm -f deploy/docker/Dockerfile .
# Needs debootstrap and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org); nothing from a registry.
set -eu

tag=${1:-qpeft-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d "${TMPDIR:-/tmp}/qpeft-base.XXXXXX")
trap 'rm -rf "$root"' EXIT

# python3-venv brings ensurepip's wheels (the Dockerfile makes a virtualenv); tini is the image's PID 1
# and comes with the base so that the build needs no Debian mirror of its own.
debootstrap --variant=minbase --include=python3,python3-venv,tini,ca-certificates \
  bookworm "$root" "$mirror"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
# `python3 -m venv` in the Dockerfile works on both bases; the official image's `python` name is absent here.
tar -C "$root" --numeric-owner -c . |
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag"
echo "$tag"
