#!/bin/sh
# Downloads every wheel the image installs (the lock's versions) into a directory, with this host's pip and
# its settings (proxy, certificates, find-links), for a build that reaches no package index:
#   deploy/docker/wheelhouse.sh build/wheels
#   python3 -m http.server --bind 127.0.0.1 8099 --directory build/wheels &
#   docker build --network host --build-arg PIP_WHEELS=http://127.0.0.1:8099/ ...
# Run it with a CPython 3.11 on Linux x86_64 (the image's platform), e.g. PYTHON=.venv/bin/python.
# Files already in the directory are kept, so a CI machine that keeps it downloads only what changed.
# torch's CPU build: from pip's find-links where the host has it, else TORCH_INDEX.
set -eu
cd "$(dirname "$0")/../.."

dir=${1:-build/wheels}
python=${PYTHON:-python3}
index=${TORCH_INDEX:+--extra-index-url $TORCH_INDEX}
mkdir -p "$dir"
# what the directory was filled from: the same inputs again download nothing (pip would still re-resolve)
stamp=$(cat pyproject.toml requirements/lock.txt requirements/no-deps.txt | sha1sum | cut -c1-16)
[ "$(cat "$dir/.inputs" 2>/dev/null)" = "$stamp" ] && exit 0
deps=$dir/.requirements.txt
# the same list the Dockerfile installs: the project's dependencies and its models extra
"$python" deploy/docker/deps.py > "$deps"
# shellcheck disable=SC2086  # $index is empty or two words
"$python" -m pip download -q -d "$dir" $index -c requirements/lock.txt \
  pip setuptools wheel uv torch -r "$deps"
"$python" -m pip download -q -d "$dir" --no-deps -r requirements/no-deps.txt
rm "$deps"
echo "$stamp" > "$dir/.inputs"
