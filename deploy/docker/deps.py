"""Prints the requirements the image installs before the project's code: pyproject.toml's dependencies and its
`models` extra, one a line (pip -r format; versions come from requirements/lock.txt as constraints).
Used by deploy/docker/Dockerfile and deploy/docker/wheelhouse.sh; standard library only."""

import sys
import tomllib
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
project = tomllib.loads(path.read_text())["project"]
print(*project["dependencies"], *project["optional-dependencies"]["models"], sep="\n")
