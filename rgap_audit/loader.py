"""Load the models a user's file defines: import it, find or read its models, construct them.

The loading convention (documented in the README, "Which models a file defines"):

* A file may declare ``RGAP_MODELS``: a dict ``{"Name": spec}``, a list of specs, or a function
  returning either. A spec is a class / factory function, or a dict with ``factory`` and optional
  ``input_shape`` (one sample, no batch dimension), ``loss``, ``batch_size``. When the declaration
  exists it is the list of models of the file.
* Without a declaration the loader discovers, in definition order, the public ``nn.Module``
  subclasses DEFINED in the file (not imported) that construct without arguments and have
  parameters, and the public functions defined in the file whose return annotation is an
  ``nn.Module`` (sub)class and that need no arguments. Classes used as sub-modules of another
  discovered model are building blocks, not models, and are left out. Unannotated functions are
  never called: calling arbitrary module-level functions (``main``, ``train``, ``download``) would
  be dangerous; the annotation is the author's statement that the function builds a model.
* ``PATH:NAME`` picks one model: a declared name, or any module-level class or function of the file.
  PATH may also be a dotted module name (``pkg.models.resnet``), found under the working directory or
  on sys.path.
* A file inside a package (an ``__init__.py`` beside it, and so on up) is imported as a module of that
  package, with the folder above the package on sys.path, so its relative imports work; any other file
  is imported with its own folder on sys.path.
* A declaration may also say how forward is called (``example_inputs``, ``private_input``,
  ``batch_dim``) and which of its outputs is the logits (``output``); see options.ForwardCall.

Each model is constructed once on the ``meta`` device first (no memory is allocated) to estimate its
size against the memory budget before anything large is built, then for real while every
``nn.Module.__init__`` is watched, so that each layer remembers the line of the audited file that
constructed it (``LoadedModel.layer_locations``). Network connections are refused while the user's
code runs.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import inspect
import itertools
import math
import os
import socket
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from rgap_audit import ops
from rgap_audit.choices import LOSSES
from rgap_audit.errors import AuditError
from rgap_audit.forwardcall import arity_error, example_args, sample_shape
from rgap_audit.options import AuditOptions, ForwardCall, LoadedModel
from rgap_audit.records import Location
from rgap_audit.targets import CALL_KEYS, check_call, display_path, module_file, package_of, parse_shape  # noqa: F401  (module_file: re-exported)

DECLARATION = "RGAP_MODELS"
SPEC_KEYS = ("factory", "name", "input_shape", "loss", "batch_size", "output", "example_inputs", "private_input", "batch_dim")

# bytes per entry of the audit's working copies (float64) and how many copies it keeps: parameters
# (float32 original + float64 copy + gradient) and activations (value, gradient, instance environment,
# plus the per-layer Jacobian work that scales with them). An estimate, deliberately on the high side.
_PARAM_BYTES = 4 + 8 * 2
_ACTIVATION_BYTES = 8 * 4

_counter = itertools.count()


# --------------------------------------------------------------------------- helpers


def _check_loss(loss: Any) -> str | None:
    if loss is None:
        return None
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; supported: {', '.join(LOSSES)}")
    return str(loss)


def _check_batch(batch: Any) -> int | None:
    if batch is None:
        return None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch!r}")
    return batch



def _import_remedy(exc: ImportError) -> str:
    """What to do about an import the audited file (or a module it imports) could not make."""
    tail = (
        "rgap-audit imports the whole file, so every module it imports must be importable, even one the model needs "
        f"only for data loading or training; or declare the models ({DECLARATION}) in a small file that imports only "
        "the model code (see README)"
    )
    name = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and name:
        return f"; install the package that provides {name.split('.')[0]!r}, if the model needs it: {tail}"
    return f"; install a version of the package that provides it, if the model needs it: {tail}"


def _innermost_line(exc: BaseException, file: str) -> int | None:
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == file:
            line = frame.lineno
    return line


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Refuse network connections and name lookups while the user's code runs.

    Not a sandbox: it stops accidental downloads (pretrained weights, datasets) from making an audit
    depend on the network, and says so in the error instead of hanging.
    """

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("network access is disabled while rgap-audit runs the model file")

    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)
    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        path = getattr(sys, "path", None)  # None when a generator holding this is finalised at interpreter exit
        if isinstance(path, list) and directory in path:
            path.remove(directory)


def _column(frame: types.FrameType) -> int:
    """1-based column of the expression a frame is executing (Python >= 3.11), else 1."""
    positions = getattr(frame.f_code, "co_positions", None)
    if positions is None:
        return 1
    try:
        pos = next(itertools.islice(positions(), frame.f_lasti // 2, None))
        return pos[2] + 1 if pos[2] is not None else 1
    except StopIteration:
        return 1


def _constructing(frame: types.FrameType, obj: object) -> bool:
    """Whether `frame` is an `__init__` running on `obj` (whatever its first parameter is called)."""
    code = frame.f_code
    return code.co_name == "__init__" and code.co_argcount > 0 and frame.f_locals.get(code.co_varnames[0]) is obj


@contextlib.contextmanager
def _record_construction(file: str, sites: dict[int, tuple[nn.Module, Location]]) -> Iterator[None]:
    """Watch nn.Module.__init__: remember, per module object, the line of `file` that created it.

    The site is the innermost frame of `file` outside the object's own constructor chain (its
    `__init__` and the `super().__init__()` calls), i.e. the `nn.Conv2d(...)` or `Block(...)` call.
    """
    original = nn.Module.__init__

    def watching_init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None and _constructing(frame, self):
            frame = frame.f_back  # the object's own constructor chain
        while frame is not None and frame.f_code.co_filename != file:
            frame = frame.f_back
        # a lambda (`act = lambda: nn.ReLU()`) is an abbreviation: its caller's line is the specific one
        while frame is not None and frame.f_code.co_name == "<lambda>" and frame.f_back is not None and frame.f_back.f_code.co_filename == file:
            frame = frame.f_back
        if frame is not None:
            sites[id(self)] = (self, Location(file, frame.f_lineno, _column(frame)))
        original(self, *args, **kwargs)

    nn.Module.__init__ = watching_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__init__ = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- candidates


@dataclass
class _Candidate:
    name: str
    factory: Callable[[], Any]
    location: Location
    declared: bool  # from RGAP_MODELS or named on the command line: never filtered out
    input_shape: tuple[int, ...] | None = None
    loss: str | None = None
    batch_size: int | None = None
    call: dict[str, Any] = field(default_factory=dict)  # declared ForwardCall keys (output, example_inputs, ...)
    needs_args: list[str] = field(default_factory=list)
    meta: nn.Module | None = None  # the meta-device instance, when it could be built
    real: nn.Module | None = None  # a real instance built early (meta construction failed)
    sites: dict[int, tuple[nn.Module, Location]] = field(default_factory=dict)  # of the real build


def _required_params(obj: Callable) -> list[str] | None:
    """Names of the parameters a call without arguments would miss; None if not inspectable."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _returns_module(fn: Callable) -> bool:
    """Whether `fn` is annotated to return an nn.Module (sub)class (string annotations resolved)."""
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable string annotation: not a declared factory
        return False
    return isinstance(hint, type) and issubclass(hint, nn.Module)


class _Source:
    """Definition lines of the file's top-level names and of the RGAP_MODELS entries (via ast)."""

    def __init__(self, tree: ast.Module, file: str):
        self.file = file
        self.defs: dict[str, Location] = {}
        self.decl: Location | None = None
        self.decl_keys: dict[str, Location] = {}
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                self.defs[node.name] = Location(file, node.lineno, node.col_offset + 1)
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    self.defs.setdefault(t.id, Location(file, node.lineno, node.col_offset + 1))
                    if t.id == DECLARATION:
                        self.decl = Location(file, node.lineno, node.col_offset + 1)
                        value = getattr(node, "value", None)
                        if isinstance(value, ast.Dict):
                            for key in value.keys:
                                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                                    self.decl_keys[key.value] = Location(file, key.lineno, key.col_offset + 1)
            if isinstance(node, (ast.FunctionDef)) and node.name == DECLARATION:
                self.decl = self.defs[node.name]

    def of(self, obj: Any, name: str | None = None) -> Location | None:
        """Where `obj` (a class or function of this file) is defined."""
        qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
        if qual in self.defs:
            return self.defs[qual]
        code = getattr(obj, "__code__", None)
        if code is not None and code.co_filename == self.file:
            return Location(self.file, code.co_firstlineno, 1)
        if name in self.defs:
            return self.defs[name]
        return None


# --------------------------------------------------------------------------- the loader


class _FileLoader:
    def __init__(self, path: str, options: AuditOptions, fallback: Mapping[str, Any] | None, per_model: Mapping[str, Mapping[str, Any]] | None):
        self.file = display_path(path)
        self.options = options
        self.fallback = dict(fallback or {})
        self.per_model = {k: dict(v) for k, v in (per_model or {}).items()}
        self.module: types.ModuleType | None = None
        self.src: _Source | None = None
        self.package, self.root = package_of(self.file)

    def error(self, cause: str, model: str | None = None, line: int | None = None) -> AuditError:
        return AuditError(cause, file=self.file, model=model, line=line)

    # ---- import
    def import_file(self, model: str | None) -> None:
        file = self.file
        if not os.path.exists(file):
            dotted = not file.endswith(".py") and all(p.isidentifier() for p in file.split("."))
            raise self.error("no such file" + (" (nor a module of that name under the working directory or on sys.path)" if dotted else ""), model)
        if os.path.isdir(file):
            raise self.error("is a directory: pass the Python files that define models", model)
        try:
            with open(file, "rb") as fh:
                source = fh.read()
        except OSError as exc:
            raise self.error(f"cannot read the file: {exc.strerror or exc}", model) from exc
        try:
            tree = ast.parse(source, filename=file)
        except SyntaxError as exc:
            raise self.error(f"syntax error: {exc.msg}", model, exc.lineno) from exc
        except ValueError as exc:  # null bytes
            raise self.error(f"cannot parse the file: {exc}", model) from exc
        self.src = _Source(tree, file)
        digest = hashlib.sha1(os.path.abspath(file).encode()).hexdigest()[:10]
        mod_name = f"rgap_audit_user_{digest}_{next(_counter)}"
        if self.package is not None:
            # a module of its package (`from .utils import x` resolves against it), under a name of its own so
            # that the package's real module, if its __init__ imports it, is neither replaced nor reused
            mod_name = f"{self.package}.{mod_name}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        if spec is None or spec.loader is None:
            raise self.error("cannot import the file (not a Python source file?)", model)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # classes resolve their module (type hints, pickling, fx)
        # compile under the display path: tracebacks, trace errors and layer locations then name the
        # file as the user wrote it, and frames are matched against it by plain comparison
        code = compile(source, file, "exec", dont_inherit=True)
        try:
            with no_network():
                exec(code, module.__dict__)
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:
            sys.modules.pop(mod_name, None)
            raise self.error(f"the file called sys.exit({exc.code!r}) while being imported", model, _innermost_line(exc, file)) from exc
        except ImportError as exc:
            sys.modules.pop(mod_name, None)
            raise self.error(f"importing the file failed: {_exc_text(exc)}{_import_remedy(exc)}", model, _innermost_line(exc, file)) from exc
        except BaseException as exc:
            sys.modules.pop(mod_name, None)
            raise self.error(f"importing the file failed: {_exc_text(exc)}", model, _innermost_line(exc, file)) from exc
        self.module = module

    # ---- finding the models
    def _defined_here(self, obj: Any) -> bool:
        return getattr(obj, "__module__", None) == self.module.__name__  # type: ignore[union-attr]

    def _spec(self, name: str | None, spec: Any, where: Location) -> _Candidate:
        """One RGAP_MODELS entry -> a candidate (validated)."""
        fields: dict[str, Any]
        if isinstance(spec, Mapping):
            fields = dict(spec)
            unknown = sorted(set(fields) - set(SPEC_KEYS))
            if unknown:
                raise self.error(f"{DECLARATION}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SPEC_KEYS)}", name, where.line)
            if "factory" not in fields:
                raise self.error(f"{DECLARATION}: entry has no 'factory'", name, where.line)
        else:
            fields = {"factory": spec}
        factory = fields["factory"]
        name = name or fields.get("name") or getattr(factory, "__name__", None)
        if isinstance(factory, nn.Module):
            raise self.error(f"{DECLARATION}: factory is a module instance; give its class or a function that builds it (e.g. lambda: model)", name, where.line)
        if not callable(factory):
            raise self.error(f"{DECLARATION}: factory must be a class or a function, got {type(factory).__name__}", name, where.line)
        if not name:
            raise self.error(f"{DECLARATION}: entry needs a name", None, where.line)
        try:
            shape = parse_shape(fields["input_shape"]) if fields.get("input_shape") is not None else None
            loss = _check_loss(fields.get("loss"))
            batch = _check_batch(fields.get("batch_size"))
            call = check_call(fields)
        except ValueError as exc:
            raise self.error(f"{DECLARATION}: {exc}", str(name), where.line) from exc
        loc = self.src.of(factory) if self._defined_here(factory) or getattr(getattr(factory, "__code__", None), "co_filename", None) == self.file else None  # type: ignore[union-attr]
        return _Candidate(str(name), factory, loc or where, True, shape, loss, batch, call)

    def declared(self) -> list[_Candidate] | None:
        decl = self.module.__dict__.get(DECLARATION)
        if decl is None:
            return None
        where = self.src.decl or Location(self.file, 1)  # type: ignore[union-attr]
        if callable(decl) and not isinstance(decl, type):
            try:
                with no_network():
                    decl = decl()
            except Exception as exc:
                raise self.error(f"{DECLARATION}() failed: {_exc_text(exc)}", None, _innermost_line(exc, self.file) or where.line) from exc
        out: list[_Candidate] = []
        if isinstance(decl, Mapping):
            for key, spec in decl.items():
                out.append(self._spec(str(key), spec, self.src.decl_keys.get(str(key), where)))  # type: ignore[union-attr]
        elif isinstance(decl, (list, tuple)):
            for spec in decl:
                out.append(self._spec(None, spec, where))
        else:
            out.append(self._spec(None, decl, where))
        names = [c.name for c in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise self.error(f"{DECLARATION}: duplicate model name(s) {', '.join(dup)}", None, where.line)
        return out

    def discovered(self) -> tuple[list[_Candidate], list[tuple[str, Location | None]]]:
        """Classes and annotated factories defined in the file; plus 'Name(args)' of those needing arguments."""
        out: list[_Candidate] = []
        needs: list[tuple[str, Location | None]] = []
        seen: set[int] = set()
        for name, obj in list(self.module.__dict__.items()):
            if name.startswith("_") or id(obj) in seen or not self._defined_here(obj):
                continue
            if (isinstance(obj, type) and issubclass(obj, nn.Module) and not inspect.isabstract(obj)) or (inspect.isfunction(obj) and _returns_module(obj)):
                pass
            else:
                continue
            seen.add(id(obj))
            required = _required_params(obj)
            if required:
                needs.append((f"{name}({', '.join(required)})", self.src.of(obj, name)))  # type: ignore[union-attr]
                continue
            out.append(_Candidate(name, obj, self.src.of(obj, name) or Location(self.file, 1), False))  # type: ignore[union-attr]
        return out, needs

    def named(self, name: str, declared: list[_Candidate] | None) -> _Candidate:
        for c in declared or []:
            if c.name == name:
                return c
        obj = self.module.__dict__.get(name)
        if obj is None or not ((isinstance(obj, type) and issubclass(obj, nn.Module)) or inspect.isfunction(obj)):
            if declared is not None:
                available = [c.name for c in declared]
            else:
                available = [c.name for c in self.discovered()[0]]
            hint = f" (models here: {', '.join(available)})" if available else ""
            if isinstance(obj, nn.Module):
                hint = "; it is a module instance: name its class or a function that builds it"
            raise self.error(f"no model named {name!r} in this file{hint}", name)
        return _Candidate(name, obj, self.src.of(obj, name) or Location(self.file, 1), True)  # type: ignore[union-attr]

    # ---- building
    def _call(self, cand: _Candidate, meta: bool, sites: dict | None = None) -> nn.Module:
        required = _required_params(cand.factory)
        if required:
            raise self.error(
                f"constructor needs arguments ({', '.join(required)}): declare a factory that supplies them in {DECLARATION} (see README)",
                cand.name,
                cand.location.line,
            )
        ctx: contextlib.AbstractContextManager = torch.device("meta") if meta else contextlib.nullcontext()
        rec: contextlib.AbstractContextManager = _record_construction(self.file, sites) if sites is not None else contextlib.nullcontext()
        try:
            # weights "as constructed" from a fixed seed: the same report whatever ran before (other
            # models, other files), without touching the caller's global RNG
            with no_network(), ctx, rec, torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.options.seed)
                model = cand.factory()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            if meta:
                raise
            hint = ""
            if isinstance(exc, ModuleNotFoundError) and exc.name:  # imported inside the constructor: the model needs it
                hint = f"; the model imports it when it is constructed: install the package that provides {exc.name.split('.')[0]!r}"
            raise self.error(
                f"constructing the model failed: {_exc_text(exc)}{hint}", cand.name, _innermost_line(exc, self.file) or cand.location.line
            ) from exc
        if not isinstance(model, nn.Module):
            raise self.error(f"the factory returned {type(model).__name__}, not an nn.Module", cand.name, cand.location.line)
        return model

    def try_meta(self, cand: _Candidate) -> None:
        """Build the candidate on the meta device (no memory); on failure keep a real instance instead."""
        try:
            cand.meta = self._call(cand, meta=True)
        except AuditError:
            raise
        except BaseException:  # factories that load weights, call .to(), ... cannot run on meta
            cand.meta = None

    def settings(self, cand: _Candidate) -> tuple[tuple[int, ...] | None, str | None, int | None]:
        """Input shape, loss, batch size: command line > config [models] > declaration > config defaults."""
        over = self.per_model.get(cand.name, {})

        def pick(key: str, opt: Any, declared: Any) -> Any:
            for v in (opt, over.get(key), declared, self.fallback.get(key)):
                if v is not None:
                    return v
            return None

        shape = pick("input_shape", self.options.input_shape, cand.input_shape)
        return (
            tuple(int(s) for s in shape) if shape is not None else None,
            pick("loss", self.options.loss, cand.loss),
            pick("batch_size", self.options.batch_size, cand.batch_size),
        )

    def forward_call(self, cand: _Candidate) -> ForwardCall:
        """How forward is called: [tool.rgap-audit.models.NAME] above the declaration (no flags set these)."""
        over = self.per_model.get(cand.name, {})
        merged = {**cand.call, **{k: v for k, v in over.items() if k in CALL_KEYS and v is not None}}
        return ForwardCall(**merged)

    def infer_shape(self, cand: _Candidate, model: nn.Module) -> tuple[int, ...]:
        """The input shape when the model's first operation fixes it (a Linear); else an error."""
        first, target = _first_op(model)
        info = None
        if first is not None:
            info = ops.lookup(None, first)
        elif target is not None:
            info = ops.lookup(target)
        hint: tuple[int, ...] | str = ""
        if info is not None and info.shape_hint is not None:
            hint = info.shape_hint(first)  # a module-less hint (a reshape function) ignores its argument
        if isinstance(hint, tuple):
            return hint
        raise self.error(
            f"input shape unknown{hint}: pass --input-shape, set input-shape in [tool.rgap-audit.models.{cand.name}], "
            f"or declare input_shape in {DECLARATION}",
            cand.name,
            cand.location.line,
        )

    def example_shape(self, cand: _Candidate, model: nn.Module, call: ForwardCall, batch: int) -> tuple[int, ...]:
        """One sample's shape from the private argument of the declared example_inputs."""
        probe = LoadedModel(file=self.file, name=cand.name, module=model, location=cand.location, call=call)
        with no_network(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            example = example_args(probe, batch)
        assert example is not None
        args, index = example
        return sample_shape(args[index], call.batch_dim)

    def check_budget(self, cand: _Candidate, model: nn.Module, shape: tuple[int, ...], batch: int) -> None:
        """Refuse models whose audit would need more than the memory budget (estimate, see _PARAM_BYTES).

        Called on the meta instance first (parameters and the input only: nothing is allocated), then
        on the real one (with the activations of one measured forward pass).
        """
        params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        acts = _activation_entries(model, shape, batch)
        est = params * _PARAM_BYTES + acts * _ACTIVATION_BYTES
        mb = est / 2**20
        budget = float(self.options.memory_budget_mb)
        if mb > budget:
            raise self.error(
                f"model too large for the memory budget: about {mb:,.0f} MB estimated "
                f"({params:,} parameters, {acts:,} activation entries at batch {batch}) > {budget:,.0f} MB; "
                "raise --memory-budget-mb or audit a smaller variant",
                cand.name,
                cand.location.line,
            )

    def build(self, cand: _Candidate) -> LoadedModel:
        probe = cand.meta if cand.meta is not None else cand.real
        if probe is None:
            self.try_meta(cand)
            probe = cand.meta
        shape, loss, batch = self.settings(cand)
        call = self.forward_call(cand)
        try:
            loss = _check_loss(loss)
            batch = _check_batch(batch)
        except ValueError as exc:
            raise self.error(str(exc), cand.name, cand.location.line) from exc
        if probe is not None and (why := arity_error(probe, call)) is not None:
            raise self.error(why, cand.name, cand.location.line)
        if shape is None and call.example_inputs is not None:
            probe = None  # the shape comes from example_inputs, called on the real model
        if probe is not None:
            if shape is None:
                shape = self.infer_shape(cand, probe)
            self.check_budget(cand, probe, shape, batch or 1)
        if cand.real is not None:
            model, sites = cand.real, cand.sites
        else:
            sites = {}
            model = self._call(cand, meta=False, sites=sites)
        cand.real, cand.sites = None, {}
        if shape is None and call.example_inputs is not None:
            shape = self.example_shape(cand, model, call, batch or 1)
        if shape is None:  # the meta build failed
            shape = self.infer_shape(cand, model)
        self.check_budget(cand, model, shape, batch or 1)
        model.eval()
        layer_locations: dict[str, Location] = {}
        for path, sub in model.named_modules(remove_duplicate=False):
            site = sites.get(id(sub))
            if path and site is not None and site[0] is sub:
                layer_locations[path] = site[1]
        return LoadedModel(
            file=self.file,
            name=cand.name,
            module=model,
            input_shape=shape,
            loss=loss,
            batch_size=batch,
            location=cand.location,
            layer_locations=layer_locations,
            call=call,
        )


def _first_op(model: nn.Module) -> tuple[nn.Module | None, Any]:
    """The module (or call target) that first consumes the input: fx order, else registration order."""
    if not list(model.children()):
        return model, None
    try:
        gm = fx.symbolic_trace(model)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if placeholders:
            users = list(placeholders[0].users)
            if len(users) == 1:
                user = users[0]
                if user.op == "call_module":
                    return gm.get_submodule(str(user.target)), None
                return None, user.target
            return None, None
    except Exception:
        pass
    for sub in model.modules():
        if not list(sub.children()):
            return sub, None
    return None, None


def _activation_entries(model: nn.Module, shape: tuple[int, ...], batch: int) -> int:
    """Entries of every leaf module's output on one forward pass at `batch` samples.

    Measured on one real sample without gradients (outputs are freed as the forward goes on, so the
    peak is about two layer outputs) and scaled by the batch size. A meta-device forward would
    allocate nothing but pulls in torch's Python reference kernels (seconds of import per run).
    A forward that fails counts what ran: the trace reports the failure properly.
    """
    base = batch * math.prod(shape)
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    if param is not None and param.device.type == "meta":
        return base
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    counted = 0

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal counted
        if isinstance(out, torch.Tensor):
            counted += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with no_network(), torch.no_grad():
            model(torch.zeros((1, *shape), dtype=dtype))
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
    return base + counted * batch


def iter_models(
    path: str,
    names: list[str] | None,
    options: AuditOptions,
    *,
    fallback: Mapping[str, Any] | None = None,
    per_model: Mapping[str, Mapping[str, Any]] | None = None,
    allow_empty: bool = False,
) -> Iterator[LoadedModel | AuditError]:
    """Load the models of one file one at a time, yielding an AuditError for each that fails.

    A file-level failure (missing file, syntax or import error, nothing found) is yielded once and
    ends the iteration; a model-level failure does not stop the other models of the file.
    `fallback` holds config defaults (input_shape, loss, batch_size) below the file's declaration;
    `per_model` holds config settings per model name, above it; `options` overrides both.
    `allow_empty` turns "no model found" into an empty result (pre-commit over every Python file).
    """
    fl = _FileLoader(path, options, fallback, per_model)
    one = names[0] if names and len(names) == 1 else None
    try:
        with _on_sys_path(fl.root):
            fl.import_file(one)
            declared = fl.declared()
            if names:
                cands = []
                for n in dict.fromkeys(names):
                    try:
                        cands.append(fl.named(n, declared))
                    except AuditError as err:
                        yield err
            elif declared is not None:
                cands = declared
                if not cands:
                    raise fl.error(f"{DECLARATION} is empty")
            else:
                found, needs = fl.discovered()
                cands = []
                failed = 0
                for c in found:
                    try:
                        fl.try_meta(c)
                        if c.meta is None:  # build it for real now, once, to see what it is
                            c.real = fl._call(c, meta=False, sites=c.sites)
                        cands.append(c)
                    except AuditError as err:
                        failed += 1
                        yield err
                cands = _top_level_models(cands)
                if not cands and failed:
                    return  # the failures were reported: "no model found" would be a second, wrong error
                if not cands and not found:
                    if allow_empty and not needs:
                        return
                    if needs:
                        raise fl.error(
                            f"no model found: {', '.join(n for n, _ in needs)} need(s) constructor arguments; "
                            f"declare a factory that supplies them in {DECLARATION} (see README)",
                            None,
                            needs[0][1].line if needs[0][1] else None,
                        )
                if not cands and not (allow_empty and not needs):
                    raise fl.error(
                        f"no model found: define an nn.Module subclass that constructs without arguments, "
                        f"a function annotated `-> nn.Module`, or {DECLARATION} (see README)"
                    )
            for cand in cands:
                try:
                    yield fl.build(cand)
                except AuditError as err:
                    yield err
                finally:
                    cand.meta = cand.real = None
    except AuditError as err:
        yield err


def _top_level_models(cands: list[_Candidate]) -> list[_Candidate]:
    """Drop discovered classes without parameters, and those used inside another discovered model."""
    instances = {id(c): (c.meta if c.meta is not None else c.real) for c in cands}
    inner: set[type] = set()
    for c in cands:
        inst = instances[id(c)]
        if inst is not None:
            inner.update(type(m) for m in list(inst.modules())[1:])
    keep = []
    for c in cands:
        inst = instances[id(c)]
        if inst is not None and next(inst.parameters(), None) is None:
            continue  # an activation, a loss, a wrapper: nothing to leak
        if isinstance(c.factory, type) and c.factory in inner:
            continue  # a building block of another model
        keep.append(c)
    return keep


def load_models(path: str, names: list[str] | None, options: AuditOptions, **kwargs: Any) -> list[LoadedModel]:
    """Load every model of `path` (or the named ones); raise the first AuditError met.

    Keyword arguments are those of `iter_models` (config fallbacks, per-model settings).
    """
    out: list[LoadedModel] = []
    for item in iter_models(path, names, options, **kwargs):
        if isinstance(item, AuditError):
            raise item
        out.append(item)
    return out
