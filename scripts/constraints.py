"""Print constraints.txt: the installed version of every package in jax-erasepro[dev]'s dependency closure.

    python scripts/constraints.py > constraints.txt    # after a full test run passed with these versions
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

LOCAL = re.compile(r"\+.*$")  # torch's "+cpu": the pin in pyproject matches any local build


def closure(name: str, extras: tuple[str, ...] = ()) -> dict[str, str]:
    """Normalised package name -> installed version, for ``name[extras]`` and everything it requires."""
    found: dict[str, str] = {}
    todo, done = [(name, extras)], set()
    while todo:
        pkg, ext = todo.pop()
        if (pkg.lower(), ext) in done:
            continue
        done.add((pkg.lower(), ext))
        try:
            dist = distribution(pkg)
        except PackageNotFoundError:
            continue
        found[re.sub(r"[-_.]+", "-", pkg).lower()] = LOCAL.sub("", dist.version)
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *ext))
            if wanted:
                todo.append((req.name, tuple(sorted(req.extras))))
    found.pop("jax-erasepro", None)
    return found


if __name__ == "__main__":
    print('# The versions the test suite passed with: pip install -e ".[dev]" -c constraints.txt')
    print("# Regenerate: python scripts/constraints.py > constraints.txt")
    for pkg, version in sorted(closure("jax-erasepro", ("dev",)).items()):
        print(f"{pkg}=={version}")
