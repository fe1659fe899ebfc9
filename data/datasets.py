"""Registry of the public datasets that the tests and benchmarks read: where each came from, and the
sha256 of every file, so that a run can check it reads the bytes the published numbers were
measured on (``benchmarks/RESULTS.md``).

The data live outside the project, in the data root: ``$STPIPE_SHARED_DATA``, else
``../shared/data`` beside the repository (never inside it). Nothing is downloaded: the files are
copies, some of them derived (the DLPFC matrices are a gene subset of spatialLIBD's), so a mismatch
means "not the data the results were measured on", and the message says where the data came from.

The registry itself is ``data/datasets.json``: ``{name: {"source": URL, "description": text,
"files": {path relative to root/name: sha256}}}``. ``python -m data.datasets`` checks every
registered file under the root; ``--write NAME ...`` (maintainers) records the files now there.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
REGISTRY_FILE = Path(__file__).with_name("datasets.json")


def data_root() -> Path:
    """Where the shared datasets live: ``$STPIPE_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("STPIPE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class Dataset:
    name: str           # folder under the data root
    source: str         # public origin (URL)
    description: str
    files: dict         # path relative to <root>/<name> -> sha256 (hex)


def registry(path: Path = REGISTRY_FILE) -> dict[str, Dataset]:
    """Every registered dataset by name."""
    raw = json.loads(Path(path).read_text())
    return {name: Dataset(name, d["source"], d["description"], dict(d["files"])) for name, d in raw.items()}


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(name: str, files=None, root: Path | None = None) -> Path:
    """Check ``files`` (relative paths; default: all) of dataset ``name`` against the registry and
    return the dataset's folder. A missing file or one whose sha256 differs raises
    :class:`InputError` naming the file and where the data came from."""
    reg = registry()
    if name not in reg:
        raise InputError(f"dataset {name!r} is not registered in {REGISTRY_FILE} (known: {', '.join(reg)}).")
    ds = reg[name]
    folder = Path(root or data_root()) / name
    for rel in (ds.files if files is None else files):
        if rel not in ds.files:
            raise InputError(f"{folder / rel}: not a registered file of dataset {name!r} ({REGISTRY_FILE}).")
        path = folder / rel
        if not path.exists():
            raise InputError(f"{path}: missing. Dataset {name!r} ({ds.description}) comes from {ds.source}; "
                             f"put it under {folder} or point STPIPE_SHARED_DATA at the folder holding {name}/.")
        if sha256(path) != ds.files[rel]:
            raise InputError(f"{path}: its sha256 differs from {REGISTRY_FILE}: not the file the benchmarks in "
                             f"benchmarks/RESULTS.md were measured on (dataset {name!r}, from {ds.source}).")
    return folder


def files_of(name: str, prefix: str = "") -> list[str]:
    """Registered files of dataset ``name`` whose relative path starts with ``prefix``."""
    return sorted(f for f in registry()[name].files if f.startswith(prefix))


def write_registry(names, root: Path | None = None) -> None:
    """Record every file now under ``<root>/<name>`` for ``names`` (maintainers, when data are added;
    a new dataset's ``source`` and ``description`` are then filled in by hand in the JSON)."""
    root = Path(root or data_root())
    current = json.loads(REGISTRY_FILE.read_text()) if REGISTRY_FILE.exists() else {}
    for name in names:
        folder = root / name
        files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        old = current.get(name, {})
        current[name] = {"source": old.get("source", ""), "description": old.get("description", ""), "files": files}
    REGISTRY_FILE.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Check the shared datasets against data/datasets.json.")
    p.add_argument("--root", type=Path, default=None, help="data root (default: $STPIPE_SHARED_DATA or ../shared/data)")
    p.add_argument("--write", nargs="+", metavar="NAME", help="(maintainers) record the files now under the root")
    args = p.parse_args(argv)
    if args.write:
        write_registry(args.write, args.root)
        print(f"wrote {REGISTRY_FILE}")
        return 0
    status = 0
    for name, ds in registry().items():
        try:
            folder = verify(name, root=args.root)
            print(f"{name}: {len(ds.files)} files verified under {folder}")
        except InputError as exc:
            print(f"{name}: {exc}")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
