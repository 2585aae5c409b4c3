"""Results kept between runs, as ruff and mypy keep theirs: a file whose model code did not change is not
audited again.

One entry per audited file and request (the path as shown, the working directory, the names asked for,
the options that change a report), under `.rgap_audit_cache/` (`--cache-dir`, `cache-dir` in the
configuration, `--no-cache`). An entry is used only when its key matches, and the key is a digest of
everything the reports depend on:

* the model file and every file of the project it imports, found by reading their `import` statements
  (absolute and relative) and resolving them under the folders the loader puts on sys.path; libraries
  outside those folders (torch, a dataset package) are keyed by version only where listed below;
* the configuration file that applies (`pyproject.toml`, its whole text);
* rgap-audit's version and the digest of its own source and rule files, Python's, torch's, numpy's,
  scipy's, networkx's and einops' versions (read from the installed metadata: a run served from the
  cache never imports torch).

What is cached are the reports (records.ModelReport); the rules, suppressions and formats run again on
every run, so the selection, --fail-on and the format are not part of the key and a cached run prints
what a fresh one prints (each report marked `cached`). Files whose run met an error are never cached.
--verify, --save-images, --debug, --defences and --batch-sizes runs neither read nor write the cache (the attack's measurements
are not cached). An entry is a header line with the key, then a pickle read by an unpickler that
accepts rgap_audit.records' classes only; anything else, a truncated file or a key line that does not
parse, is a corrupt entry: ignored with a warning and rewritten, never trusted.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rgap_audit import __version__
from rgap_audit.records import ModelReport
from rgap_audit.targets import package_of

DEFAULT_DIR = ".rgap_audit_cache"
LAYOUT = 1  # the entry format; part of every key
MAGIC = b"rgap-audit-cache"
GITIGNORE = "# Created by rgap-audit: this folder is a cache, never commit it.\n*\n"
LIBRARIES = ("torch", "numpy", "scipy", "networkx", "einops")  # their versions change the numbers


class CorruptEntry(Exception):
    """A cache file that is not an entry this version wrote."""


@dataclass(frozen=True)
class Request:
    """What identifies one entry: the file as the reports name it and the options that change a report."""

    path: str  # as shown in the reports (loader.display_path)
    names: tuple[str, ...] | None  # the models asked for (PATH:NAME), None for all
    options: dict[str, Any]  # input_shape, batch_size, loss, seed, memory budget, --identifiability, ...
    config: str | None  # the pyproject.toml whose [tool.rgap-audit] applies, None with --no-config or none found


# ---------------------------------------------------------------------------------- the key
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _module_files(root: str, dotted: str) -> list[str]:
    """The files importing `dotted` runs under root: each package's __init__.py, then the module."""
    parts = dotted.split(".")
    out: list[str] = []
    for i in range(1, len(parts) + 1):
        base = os.path.join(root, *parts[:i])
        init = os.path.join(base, "__init__.py")
        if os.path.isfile(init):
            out.append(init)
        elif i == len(parts) and os.path.isfile(base + ".py"):
            out.append(base + ".py")
        else:
            break
    return out


def _imports(file: str, tree: ast.AST, root: str) -> Iterable[str]:
    """Dotted names the file imports (anywhere in it, lazy imports included), relative ones resolved
    against the file's own package under root."""
    rel = os.path.relpath(os.path.abspath(file), root)
    pkg = (rel[:-3].split(os.sep) if rel.endswith(".py") else [rel])[:-1]  # a module's package; __init__.py's own
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = len(pkg) - (node.level - 1)
                if up < 0 or rel.startswith(".."):
                    continue
                base = ".".join([*pkg[:up], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base:
                yield base
            for alias in node.names:
                if alias.name != "*":
                    yield f"{base}.{alias.name}" if base else alias.name


def project_sources(file: str) -> dict[str, str]:
    """sha256 of the file and of every project file it imports, transitively: path -> digest.

    The project is what the loader puts on sys.path for this file: the file's folder, or for a file
    inside a package the folder above the package. Imports that resolve to no file there are libraries.
    """
    _pkg, root = package_of(file)
    roots = list(dict.fromkeys([root, os.path.dirname(os.path.abspath(file))]))
    seen: dict[str, str] = {}
    todo = [os.path.abspath(file)]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        try:
            data = Path(current).read_bytes()
        except OSError:
            seen[current] = "unreadable"
            continue
        seen[current] = _sha(data)
        try:
            tree = ast.parse(data, filename=current)
        except (SyntaxError, ValueError):
            continue  # the loader reports it; the digest of its bytes still keys the entry
        for r in roots:
            for dotted in _imports(current, tree, r):
                if all(p.isidentifier() for p in dotted.split(".")):
                    todo.extend(f for f in _module_files(r, dotted) if f not in seen)
    return dict(sorted(seen.items()))


_TOOL_DIGEST: str | None = None


def tool_digest() -> str:
    """rgap-audit's version and a digest of its own source, rule and schema files (a changed rule or
    analysis never serves an old result, even between releases)."""
    global _TOOL_DIGEST
    if _TOOL_DIGEST is None:
        pkg = Path(__file__).resolve().parent
        h = hashlib.sha256(__version__.encode())
        files = sorted([*pkg.rglob("*.py"), *pkg.rglob("*.json"), *pkg.parent.joinpath("rules").glob("*.toml"), *pkg.rglob("*.toml")])
        for f in files:
            h.update(str(f.relative_to(pkg.parent)).encode())
            h.update(f.read_bytes())
        _TOOL_DIGEST = h.hexdigest()
    return _TOOL_DIGEST


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def entry_key(req: Request) -> str:
    """The digest an entry must carry to be used for this request (everything its reports depend on)."""
    config = None
    if req.config is not None:
        try:
            config = _sha(Path(req.config).read_bytes())
        except OSError:
            config = "unreadable"
    material = {
        "layout": LAYOUT,
        "tool": [__version__, tool_digest()],
        "python": sys.version,
        "libraries": {name: _version(name) for name in LIBRARIES},
        "path": req.path,
        "cwd": os.getcwd(),
        "names": req.names,
        "options": req.options,
        "config": [req.config, config],
        "sources": project_sources(req.path),
    }
    return _sha(json.dumps(material, sort_keys=True, default=str).encode())


def _slot(req: Request) -> str:
    """The entry's file name: one per file and request, so that an edited file replaces its entry."""
    ident = json.dumps([os.getcwd(), req.path, req.names, req.options], sort_keys=True, default=str)
    return _sha(ident.encode())[:32] + ".entry"


# ---------------------------------------------------------------------------------- reading and writing
class _RecordsOnly(pickle.Unpickler):
    """Unpickles rgap_audit.records' dataclasses and enums and plain containers, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "rgap_audit.records":
            from rgap_audit import records

            obj = getattr(records, name, None)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not a record")


def _decode(data: bytes, key: str) -> list[ModelReport] | None:
    """The reports of an entry whose key is `key`; None for another key (stale); CorruptEntry otherwise."""
    head, sep, body = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != MAGIC or parts[1] != str(LAYOUT).encode():
        raise CorruptEntry("not an rgap-audit cache entry")
    if parts[2] != key.encode():
        return None
    try:
        reports = _RecordsOnly(io.BytesIO(body)).load()
    except Exception as exc:  # a truncated or altered pickle: never trusted
        raise CorruptEntry(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    if not isinstance(reports, list) or not all(isinstance(r, ModelReport) for r in reports):
        raise CorruptEntry("the entry holds no list of model reports")
    return reports


class Cache:
    """The cache folder; `warn` receives one line per corrupt entry or failed write."""

    def __init__(self, folder: str, warn: Callable[[str], None]):
        self.folder = folder
        self.warn = warn

    def get(self, req: Request) -> tuple[str, list[ModelReport] | None]:
        """(key, the cached reports or None). Each report comes back marked `cached`."""
        key = entry_key(req)
        file = os.path.join(self.folder, _slot(req))
        try:
            data = Path(file).read_bytes()
        except OSError:
            return key, None
        try:
            reports = _decode(data, key)
        except CorruptEntry as exc:
            self.warn(f"ignoring a corrupt cache entry {file} ({exc}); the file is audited again")
            return key, None
        if reports is None:
            return key, None
        for r in reports:
            r.cached = True
        return key, reports

    def put(self, req: Request, key: str, reports: list[ModelReport]) -> None:
        """Store the reports of one file (written to a temporary file, then renamed: never half an entry)."""
        try:
            self._prepare()
            body = pickle.dumps(reports, protocol=pickle.HIGHEST_PROTOCOL)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(b" ".join([MAGIC, str(LAYOUT).encode(), key.encode()]) + b"\n" + body)
            os.replace(tmp, os.path.join(self.folder, _slot(req)))
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            self.warn(f"cannot write the cache in {self.folder}: {exc}")

    def _prepare(self) -> None:
        """Create the folder with a .gitignore that ignores everything in it (as ruff's and mypy's do)."""
        os.makedirs(self.folder, exist_ok=True)
        ignore = os.path.join(self.folder, ".gitignore")
        if not os.path.exists(ignore):
            with open(ignore, "w", encoding="utf-8") as fh:
                fh.write(GITIGNORE)
