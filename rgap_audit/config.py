"""`[tool.rgap-audit]` in pyproject.toml: find it, validate it, resolve the settings of one file.

The configuration of an audited file is the nearest pyproject.toml, walking up from the file's
directory, that has a `[tool.rgap-audit]` table (pyproject files without one are passed over, as
ruff does). Unknown keys and ill-typed values are errors that name the key and the pyproject path,
so a typo never silently disables a setting. Command-line flags override what is resolved here.

    [tool.rgap-audit]
    select = ["RGAP1"]            # rule codes or prefixes
    ignore = ["RGAP3"]
    extend-select = []
    fail-on = "warning"           # info | warning | error
    format = "concise"            # default output format
    batch-size = 1
    loss = "cross-entropy"        # logistic | cross-entropy
    seed = 0
    input-shape = [3, 32, 32]     # for models that declare none (also "3,32,32")
    memory-budget-mb = 4096
    verify-seeds = 3              # --verify: inputs the attack runs on
    leak-psnr = 30.0              # --verify: a reconstruction at PSNR >= this (dB) is a privacy leak ...
    leak-ssim = 0.9               # ... or at SSIM >= this
    cache-dir = ".rgap_audit_cache"  # where results are kept between runs, relative to this file

    [tool.rgap-audit.models.CNN6]  # per model name: above the file's RGAP_MODELS declaration
    input-shape = [3, 32, 32]
    loss = "logistic"
    batch-size = 4
    output = 0                    # forward returns several outputs: the logits are this index or key
    batch-dim = 1                 # sequence-first input; private-input = 0 names forward's private argument

    [tool.rgap-audit.per-file-settings."legacy/*.py"]  # any key above except format
    fail-on = "error"

    [tool.rgap-audit.per-file-ignores]
    "experiments/*.py" = ["RGAP101"]
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rgap_audit.choices import LOSSES
from rgap_audit.errors import AuditError
from rgap_audit.records import SEVERITIES
from rgap_audit.targets import check_call, parse_shape

SECTION = "rgap-audit"
FORMATS = ("concise", "table", "json", "sarif", "github")
SETTING_KEYS = (
    "select",
    "ignore",
    "extend-select",
    "fail-on",
    "batch-size",
    "loss",
    "seed",
    "input-shape",
    "memory-budget-mb",
    "verify-seeds",
    "leak-psnr",
    "leak-ssim",
    "models",
)
TOP_KEYS = SETTING_KEYS + ("format", "cache-dir", "per-file-settings", "per-file-ignores")
MODEL_KEYS = ("input-shape", "loss", "batch-size", "output", "batch-dim", "private-input")
CALL_SETTINGS = ("output", "batch-dim", "private-input")  # how forward is called (loader.check_call)


@dataclass
class Settings:
    """The resolved configuration of one audited file (python names; None = not set)."""

    select: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    extend_select: list[str] = field(default_factory=list)
    fail_on: str | None = None
    format: str | None = None
    cache_dir: str | None = None  # the results cache (rgap_audit.cache), resolved against the pyproject's folder
    batch_size: int | None = None
    loss: str | None = None
    seed: int | None = None
    input_shape: tuple[int, ...] | None = None
    memory_budget_mb: float | None = None
    verify_seeds: int | None = None
    leak_psnr: float | None = None
    leak_ssim: float | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {input_shape, loss, batch_size}
    file_ignores: list[str] = field(default_factory=list)  # from per-file-ignores: added even to --ignore
    path: str | None = None  # the pyproject.toml these came from

    def model_defaults(self) -> dict[str, Any]:
        """What the loader uses for a model that declares nothing itself."""
        return {"input_shape": self.input_shape, "loss": self.loss, "batch_size": self.batch_size}


def _py(key: str) -> str:
    return key.replace("-", "_")


def _codes(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuditError(f"[tool.{SECTION}] {key} must be a list of rule codes, got {value!r}", file=where)
    return [v.strip().upper() for v in value if v.strip()]


def _positive_int(value: Any, key: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AuditError(f"[tool.{SECTION}] {key} must be an integer >= {minimum}, got {value!r}", file=where)
    return value


def _value(key: str, value: Any, where: str, table: str) -> Any:
    """Validate one setting; return it in the form the CLI uses."""
    if key in ("select", "ignore", "extend-select"):
        return _codes(value, key, where)
    if key == "fail-on":
        if value not in SEVERITIES:
            raise AuditError(f"[{table}] fail-on must be one of {', '.join(SEVERITIES)}, got {value!r}", file=where)
        return value
    if key == "format":
        if value not in FORMATS:
            raise AuditError(f"[{table}] format must be one of {', '.join(FORMATS)}, got {value!r}", file=where)
        return value
    if key == "cache-dir":
        if not isinstance(value, str) or not value.strip():
            raise AuditError(f"[{table}] cache-dir must be a folder path (a non-empty string), got {value!r}", file=where)
        return os.path.join(os.path.dirname(os.path.abspath(where)), os.path.expanduser(value))
    if key == "loss":
        if value not in LOSSES:
            raise AuditError(f"[{table}] loss must be one of {', '.join(LOSSES)}, got {value!r}", file=where)
        return value
    if key == "batch-size":
        return _positive_int(value, key, where)
    if key == "seed":
        return _positive_int(value, key, where, minimum=0)
    if key == "input-shape":
        try:
            return parse_shape(value)
        except ValueError as exc:
            raise AuditError(f"[{table}] input-shape: {exc}", file=where) from exc
    if key in CALL_SETTINGS:
        try:
            check_call({_py(key): value})
        except ValueError as exc:
            raise AuditError(f"[{table}] {key}: {exc}", file=where) from exc
        return value
    if key in ("memory-budget-mb", "leak-psnr"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AuditError(f"[{table}] {key} must be a positive number, got {value!r}", file=where)
        return float(value)
    if key == "leak-ssim":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise AuditError(f"[{table}] leak-ssim must be a number in (0, 1], got {value!r}", file=where)
        return float(value)
    if key == "verify-seeds":
        return _positive_int(value, key, where)
    if key == "models":
        if not isinstance(value, dict):
            raise AuditError(f"[{table}] models must be a table of model names", file=where)
        out: dict[str, dict[str, Any]] = {}
        for name, spec in value.items():
            sub = f"{table}.models.{name}"
            if not isinstance(spec, dict):
                raise AuditError(f"[{sub}] must be a table with {', '.join(MODEL_KEYS)}", file=where)
            unknown = [k for k in spec if k not in MODEL_KEYS]
            if unknown:
                raise AuditError(f"[{sub}] unknown key {unknown[0]!r}; allowed: {', '.join(MODEL_KEYS)}", file=where)
            out[name] = {_py(k): _value(k, v, where, sub) for k, v in spec.items()}
        return out
    raise AssertionError(key)


def _table(raw: Any, allowed: tuple[str, ...], where: str, table: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise AuditError(f"[{table}] must be a table", file=where)
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise AuditError(f"[{table}] unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}", file=where)
    return {k: _value(k, v, where, table) for k, v in raw.items() if k not in ("per-file-settings", "per-file-ignores")}


@dataclass
class Config:
    """One validated `[tool.rgap-audit]` table."""

    path: str  # the pyproject.toml
    base: dict[str, Any]
    per_file: list[tuple[str, dict[str, Any]]]
    per_file_ignores: list[tuple[str, list[str]]]

    @property
    def root(self) -> Path:
        return Path(self.path).resolve().parent

    def matches(self, pattern: str, file: str) -> bool:
        """Glob relative to the pyproject's directory; a pattern without '/' also matches the file name."""
        path = Path(file).resolve()
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            rel = path.as_posix()
        pattern = pattern.removeprefix("./")
        return fnmatch.fnmatchcase(rel, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(path.name, pattern))

    def for_file(self, file: str) -> Settings:
        """Project settings, then per-file-settings (later globs win); per-file-ignores kept apart."""
        merged = dict(self.base)
        models = {k: dict(v) for k, v in merged.pop("models", {}).items()}
        for pattern, table in self.per_file:
            if self.matches(pattern, file):
                table = dict(table)
                for name, spec in table.pop("models", {}).items():
                    models.setdefault(name, {}).update(spec)
                merged.update(table)
        settings = Settings(path=self.path, models=models)
        for key, value in merged.items():
            setattr(settings, _py(key), value)
        for pattern, codes in self.per_file_ignores:
            if self.matches(pattern, file):
                settings.file_ignores = [*settings.file_ignores, *codes]
        return settings


def load_config(pyproject: str | os.PathLike[str]) -> Config | None:
    """Read and validate `[tool.rgap-audit]` of one pyproject.toml; None when it has no such table."""
    where = str(pyproject)
    try:
        with open(pyproject, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise AuditError(f"invalid TOML: {exc}", file=where) from exc
    except OSError as exc:
        raise AuditError(f"cannot read: {exc.strerror or exc}", file=where) from exc
    raw = data.get("tool", {}).get(SECTION)
    if raw is None:
        return None
    table = f"tool.{SECTION}"
    base = _table(raw, TOP_KEYS, where, table)
    per_file: list[tuple[str, dict[str, Any]]] = []
    pfs = raw.get("per-file-settings", {})
    if not isinstance(pfs, dict):
        raise AuditError(f"[{table}] per-file-settings must be a table of glob = {{settings}}", file=where)
    for pattern, sub in pfs.items():
        per_file.append((pattern, _table(sub, SETTING_KEYS, where, f"{table}.per-file-settings.{pattern!r}")))
    ignores: list[tuple[str, list[str]]] = []
    pfi = raw.get("per-file-ignores", {})
    if not isinstance(pfi, dict):
        raise AuditError(f"[{table}] per-file-ignores must be a table of glob = [codes]", file=where)
    for pattern, codes in pfi.items():
        ignores.append((pattern, _codes(codes, f"per-file-ignores.{pattern!r}", where)))
    return Config(where, base, per_file, ignores)


_CACHE: dict[tuple[str, int], Config | None] = {}


def find_config(start: str | os.PathLike[str]) -> Config | None:
    """The nearest pyproject.toml with [tool.rgap-audit], walking up from `start` (a file or folder)."""
    here = Path(start).resolve()
    if not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            key = (str(candidate), candidate.stat().st_mtime_ns)
            if key not in _CACHE:
                _CACHE[key] = load_config(_relative(candidate))
            if _CACHE[key] is not None:
                return _CACHE[key]
    return None


def _relative(path: Path) -> str:
    """Show the pyproject path relative to the working directory when it is below it."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def settings_for(file: str) -> Settings:
    """The settings of one audited file (empty Settings when no configuration applies)."""
    config = find_config(file)
    return config.for_file(file) if config is not None else Settings()
