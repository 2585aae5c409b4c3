"""One run over the files a user named: load -> instance -> analysis -> attack -> rules, per model.

`Pipeline.run` returns the reports, the findings and every error met on the way; a failing file or
model never stops the others, and a failing step never removes what earlier steps found (a model
whose --verify fails keeps its static report). What the user's code prints is held back (stdout
carries only the report); network access is refused while it runs. The command line (cli.py) only
turns arguments into a `Request` and the `Result` into output and an exit code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from rgap_audit import config as cfg
from rgap_audit import progress
from rgap_audit.choices import DEFAULT_FAIL_ON, DEFAULT_MEMORY_BUDGET_MB
from rgap_audit.errors import AuditError
from rgap_audit.records import BatchPoint, Finding, Identifiability, ModelReport, Verification
from rgap_audit.rules import Rule, RuleError, evaluate, fails, load_rules, select_rules
from rgap_audit.suppress import apply as apply_suppressions
from rgap_audit.sweep import batch_point
from rgap_audit.targets import display_path, module_file

if TYPE_CHECKING:  # pragma: no cover
    from rgap_audit.analysis import Audit
    from rgap_audit.cache import Cache
    from rgap_audit.cache import Request as CacheRequest
    from rgap_audit.defence import DefenceOptions
    from rgap_audit.options import AuditOptions, LoadedModel

# The loader and the analysis (torch, scipy, networkx), --identifiability and --verify (the attack, scipy.optimize, PIL) are
# imported where a model is audited, identified or verified: a run over files that define no model, or
# a static audit, does not pay for what it does not use, and a file served from the results cache
# (rgap_audit.cache) imports no torch at all (benchmarks/bench_cli.py). They stay attributes of this
# module (PEP 562 __getattr__), read through _stage() where they are called, so that a caller or a test
# that replaces `pipeline.build_instance` replaces the stage the run uses.
_LAZY = {
    "build_instance": "rgap_audit.instance",
    "audit_instance": "rgap_audit.analysis",
    "instance_identifiability": "rgap_audit.identifiability",
    "plot_spectrum": "rgap_audit.identifiability",
    "make_criterion": "rgap_audit.verify",
    "settle": "rgap_audit.verify",
    "verify": "rgap_audit.verify",
    "safe_name": "rgap_audit.verify.images",
    "iter_models": "rgap_audit.loader",
    "no_network": "rgap_audit.loader",
    "single_thread": "rgap_audit.threads",
    "run_defences": "rgap_audit.defence",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stage(name: str) -> Any:
    """A lazily imported stage, as this module holds it now (imported on first use)."""
    return globals()[name] if name in globals() else __getattr__(name)


@dataclass
class Request:
    """What the command line (or a caller) asks for."""

    targets: list[str]
    select: list[str] | None = None
    ignore: list[str] | None = None
    extend_select: list[str] = field(default_factory=list)
    fail_on: str | None = None
    input_shape: tuple[int, ...] | None = None
    batch_size: int | None = None
    loss: str | None = None
    seed: int | None = None
    memory_budget_mb: float | None = None
    identifiability: bool = False
    no_config: bool = False
    allow_no_models: bool = False
    verify: bool = False
    input: str | None = None
    weights: str | None = None
    save_images: str | None = None
    verify_seeds: int | None = None  # None: the configuration's, else tolerances.VERIFY_SEEDS
    leak_psnr: float | None = None  # None: the configuration's, else tolerances.LEAK_PSNR_DB
    leak_ssim: float | None = None
    debug: bool = False
    cache_dir: str | None = None  # the results cache (rgap_audit.cache); None: no cache (the CLI sets one unless --no-cache)
    defences: DefenceOptions | None = None  # --defences: what to measure (rgap_audit.defence)
    batch_sizes: list[int] | None = None  # --batch-sizes: one audit per batch size (the report is the first's)


@dataclass
class Result:
    reports: list[ModelReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    errors: list[AuditError] = field(default_factory=list)
    failed: bool = False  # some unsuppressed finding at or above its file's fail-on
    rules: list[Rule] = field(default_factory=list)


def split_target(target: str) -> tuple[str, str | None]:
    """`path.py:Name` -> (path.py, Name); a path that exists as written is never split. A dotted
    module name (`pkg.models.resnet:ResNet20`) becomes the file that defines it (loader.module_file)."""
    if os.path.exists(target) or ":" not in target:
        return module_file(target), None
    path, _, name = target.rpartition(":")
    if not path or not name or "/" in name or "\\" in name:
        return target, None
    return module_file(path), name


def group_targets(targets: list[str]) -> dict[str, list[str] | None]:
    """path -> names to audit (None: all the file's models); repeated paths are imported once."""
    groups: dict[str, list[str] | None] = {}
    for target in targets:
        path, name = split_target(target)
        path = display_path(path)
        if path in groups and groups[path] is None:
            continue
        if name is None:
            groups[path] = None
        else:
            names = groups.setdefault(path, [])
            assert names is not None
            names.append(name)
    return groups


@contextlib.contextmanager
def captured(debug: bool) -> Iterator[None]:
    """Hold what user code and libraries print while a model is loaded or audited.

    stdout must carry only the report (a JSON or SARIF document breaks on a stray print) and stderr
    only the one-line errors (torch.fx's ShapeProp prints a traceback before re-raising). With
    --debug the captured text goes to stderr.
    """
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        if debug and (out.getvalue() or err.getvalue()):
            sys.stderr.write(out.getvalue() + err.getvalue())
            sys.stderr.flush()


def internal_error(exc: BaseException, file: str, model: str | None) -> AuditError:
    """A bug of ours, as one line (the traceback with --debug)."""
    text = " ".join(str(exc).split())
    err = AuditError(f"internal error: {type(exc).__name__}: {text} (re-run with --debug for the traceback)", file, model)
    err.__cause__ = exc
    return err


class Pipeline:
    """One run: every file, every model, in order; errors are reported through `on_error` as they happen."""

    def __init__(self, request: Request, on_error: Callable[[AuditError], None]):
        self.request = request
        self.on_error = on_error
        self.result = Result()
        self.meter = progress.Meter(sys.stderr) if progress.wanted(sys.stderr) else None
        self._cache: Cache | None = None

    def error(self, err: AuditError, file: str | None = None, model: str | None = None, stage: str | None = None) -> None:
        """Record one error (with the stage it happened at, unless it says so itself) and report it."""
        err.file = err.file or file
        err.model = err.model or model
        err.stage = err.stage or stage
        self.result.errors.append(err)
        if self.meter is not None:
            self.meter.clear()
        self.on_error(err)

    def check_selection(self) -> bool:
        """Unknown codes on the command line are usage errors, found before any model is loaded."""
        req = self.request
        try:
            self.result.rules = load_rules()
            select_rules(self.result.rules, select=req.select, ignore=req.ignore, extend_select=req.extend_select)
        except AuditError as err:
            self.error(err, stage="rules" if isinstance(err, RuleError) else "usage")  # a broken rule file, or a bad code
            return False
        return True

    def run(self) -> Result:
        req = self.request
        # --verify's measurements, --save-images' files, --debug's output, --defences' sweeps and --batch-sizes' audits
        # are never served from the cache
        if req.cache_dir and not (req.verify or req.save_images or req.debug or req.defences is not None or req.batch_sizes):
            from rgap_audit.cache import Cache

            self._cache = Cache(req.cache_dir, self.warn)
        for path, names in group_targets(req.targets).items():
            self._file(path, names)
        return self.result

    def warn(self, text: str) -> None:
        """One warning line on stderr (not an error: the exit code does not change)."""
        if self.meter is not None:
            self.meter.clear()
        print(f"rgap-audit: warning: {text}", file=sys.stderr, flush=True)

    def _cache_request(self, path: str, names: list[str] | None, settings: cfg.Settings) -> CacheRequest:
        """What identifies this file's entry: the options that change a report (the selection, --fail-on
        and the format do not: rules and formats run again on cached reports)."""
        from rgap_audit.cache import Request as CacheRequest

        req = self.request
        opts = {
            "input_shape": req.input_shape, "batch_size": req.batch_size, "loss": req.loss,
            "seed": req.seed if req.seed is not None else (settings.seed or 0),
            "memory_budget_mb": req.memory_budget_mb or settings.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB,
            "identifiability": req.identifiability, "allow_no_models": req.allow_no_models, "no_config": req.no_config,
        }
        return CacheRequest(path, None if names is None else tuple(names), opts, settings.path)

    # ------------------------------------------------------------------ one file
    def _file(self, path: str, names: list[str] | None) -> None:
        req = self.request
        settings = cfg.Settings()
        if not req.no_config:
            try:
                settings = cfg.settings_for(path)
            except AuditError as err:
                self.error(err, stage="config")
                return
        entry, key = None, None
        if self._cache is not None:
            entry = self._cache_request(path, names, settings)
            key, hit = self._cache.get(entry)
            if hit is not None:
                if hit:
                    self._rules(hit, settings)
                return
        errors_before = len(self.result.errors)
        reports = self._load_and_audit(path, names, settings)
        if self._cache is not None and entry is not None and key is not None and len(self.result.errors) == errors_before:
            self._cache.put(entry, key, reports)  # before the rules: what is stored is the analysis alone
        if reports:
            self._rules(reports, settings)

    def _load_and_audit(self, path: str, names: list[str] | None, settings: cfg.Settings) -> list[ModelReport]:
        """Load the file's models and audit each (errors reported as they happen)."""
        from rgap_audit.options import AuditOptions

        iter_models = _stage("iter_models")

        req = self.request
        options = AuditOptions(
            batch_size=req.batch_size,
            loss=req.loss,
            seed=req.seed if req.seed is not None else (settings.seed or 0),
            input_shape=req.input_shape,
            memory_budget_mb=req.memory_budget_mb or settings.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB,
            debug=req.debug,
        )
        reports: list[ModelReport] = []
        items = iter_models(
            path, names, options, fallback=settings.model_defaults(), per_model=settings.models, allow_empty=req.allow_no_models
        )
        try:
            while True:
                try:
                    with captured(req.debug):
                        item = next(items)
                except StopIteration:
                    break
                except Exception as exc:  # a bug in the loader: report, go on with the next file
                    if req.debug:
                        raise
                    self.error(internal_error(exc, path, None), stage="load")
                    break
                if isinstance(item, AuditError):
                    self.error(item, stage="load")
                    continue
                report = self._model(item, options, settings)
                if report is not None:
                    reports.append(report)
                del item
        finally:
            with captured(req.debug):
                close = getattr(items, "close", None)  # the loader's sys.path entry goes now, not when the generator is collected
                if close is not None:
                    close()
        return reports

    def _rules(self, reports: list[ModelReport], settings: cfg.Settings) -> None:
        """The rules and suppressions over one file's reports, fresh or from the cache."""
        req = self.request
        self.result.reports.extend(reports)
        try:
            found = self._findings(reports, settings)
        except AuditError as err:
            self.error(err, stage="config")
            return
        self.result.findings.extend(found)
        if fails([f for f in found if not f.suppressed], req.fail_on or settings.fail_on or DEFAULT_FAIL_ON):
            self.result.failed = True

    # ------------------------------------------------------------------ one model
    def _model(self, loaded: LoadedModel, options: AuditOptions, settings: cfg.Settings) -> ModelReport | None:
        """One model, with a progress line on stderr while it runs when a person watches (rgap_audit.progress)."""
        meter = self.meter.start(loaded.name) if self.meter is not None else None
        try:
            with progress.reporting(meter):
                return self._model_steps(loaded, options, settings, meter)
        finally:
            if meter is not None:
                meter.clear()

    def _model_steps(
        self, loaded: LoadedModel, options: AuditOptions, settings: cfg.Settings, meter: progress.Meter | None
    ) -> ModelReport | None:
        """Instance, analysis, then --identifiability and --verify; None when the static audit failed."""
        req = self.request
        if req.batch_sizes:
            options = replace(options, batch_size=req.batch_sizes[0])
        got = self._static(loaded, options, meter)
        if got is None:
            return None
        audit, seconds = got
        report = audit.report
        if req.identifiability:
            self._step(loaded, "identifiability", lambda: self._identifiability(audit))
        if req.verify and not self._step(loaded, "verify", lambda: self._verify(audit, settings)):
            cause = self.result.errors[-1].cause
            report.verification = Verification(attempted=False, confirmed=None, summary=f"Failed (an error of this run): {cause}")
        if req.defences is not None:
            self._step(loaded, "defences", lambda: self._defences(audit, options))
        if req.batch_sizes:
            report.batch_sweep = self._sweep(loaded, options, settings, audit, seconds)
        return report

    def _static(self, loaded: LoadedModel, options: AuditOptions, meter: progress.Meter | None = None) -> tuple[Audit, float] | None:
        """The instance and the static analysis of one model, and their seconds; None (an error reported, at the
        stage that failed) when either fails."""
        req = self.request
        stage = "trace"
        t0 = time.perf_counter()
        try:
            build_instance, audit_instance = _stage("build_instance"), _stage("audit_instance")
            no_network, single_thread = _stage("no_network"), _stage("single_thread")
            with no_network(), captured(req.debug), single_thread():
                inst = build_instance(loaded, options)
                stage = "analysis"
                if meter is not None:
                    meter.totals["walk"] = len(inst.graph.ops())
                audit = audit_instance(inst, options)
            return audit, time.perf_counter() - t0
        except AuditError as err:
            self.error(err, loaded.file, loaded.name, stage)
        except Exception as exc:
            if req.debug:
                raise
            self.error(internal_error(exc, loaded.file, loaded.name), stage=stage)
        return None

    def _defences(self, audit: Audit, options: AuditOptions) -> None:
        """--defences: noise, compression, batch size, architecture edits; with --save-images the noise curve and the
        reconstructions at three noise levels are written to DIR/MODEL-defences-*.png."""
        assert self.request.defences is not None
        single_thread, run_defences = _stage("single_thread"), _stage("run_defences")
        with single_thread():
            found = run_defences(audit, options, self.request.defences)
        audit.report.defences = found
        if self.request.save_images and found.noise is not None:  # after the result is kept: a figure that fails removes nothing
            from rgap_audit.defence.images import write_noise_figures

            write_noise_figures(self.request.save_images, audit.instance.loaded, found.noise)

    def _sweep(self, loaded: LoadedModel, options: AuditOptions, settings: cfg.Settings, first: Audit, first_s: float) -> list[BatchPoint]:
        """--batch-sizes: the first size is the model's report; every other size is one more audit (and
        --verify on its summed gradient), kept as a BatchPoint. A size that fails is one more error."""
        req = self.request
        assert req.batch_sizes
        points = [batch_point(first.report, first_s)]
        for b in req.batch_sizes[1:]:
            got = self._static(loaded, replace(options, batch_size=b))
            if got is None:
                continue
            audit, seconds = got
            if req.verify and not self._step(loaded, "verify", functools.partial(self._verify, audit, settings)):
                audit.report.verification = Verification(attempted=False, confirmed=None, summary=f"Failed: {self.result.errors[-1].cause}")
            points.append(batch_point(audit.report, seconds))
        return points

    def _step(self, loaded: LoadedModel, stage: str, step: Callable[[], None]) -> bool:
        """A later step of one model: its failure is one more error, the report (and its findings) stay.
        Returns whether the step succeeded."""
        no_network = _stage("no_network")
        req = self.request
        try:
            with no_network(), captured(req.debug):
                step()
        except AuditError as err:
            self.error(err, loaded.file, loaded.name, stage)
            return False
        except Exception as exc:
            if req.debug:
                raise
            self.error(internal_error(exc, loaded.file, loaded.name), stage=stage)
            return False
        return True

    def _identifiability(self, audit: Audit) -> None:
        """--identifiability: rank and spectrum of d(gradient)/d(input) on the audited instance; with
        --save-images DIR the spectrum is plotted to DIR/MODEL-spectrum.png."""
        instance_identifiability, plot_spectrum, safe_name = _stage("instance_identifiability"), _stage("plot_spectrum"), _stage("safe_name")
        loaded = audit.instance.loaded
        try:
            res = instance_identifiability(audit.instance)
        except (ValueError, RuntimeError, MemoryError) as exc:
            raise AuditError(f"identifiability failed: {type(exc).__name__}: {' '.join(str(exc).split())}", loaded.file, loaded.name) from exc
        audit.report.identifiability = Identifiability(
            unknowns=res["unknowns"], gradient_entries=res["gradient_entries"], rank=res["rank"], deficit=res["deficit"],
            locally_unique=res["locally_unique"], sigma_min_rel=res["sigma_min_rel"], singular_values=res["singular_values"],
            rank_tol=res["tolerance_rel"], method=res["method"], seconds=res["seconds"], summary=res["summary"], plot=None,
        )
        if self.request.save_images:  # after the result is kept: a plot that fails removes nothing
            plot = os.path.join(self.request.save_images, f"{safe_name(loaded.name)}-spectrum.png")
            try:
                os.makedirs(self.request.save_images, exist_ok=True)
                plot_spectrum(res, plot, loaded.name)
            except OSError as exc:
                raise AuditError(f"--save-images: cannot write {plot!r}: {exc.strerror or exc}", loaded.file, loaded.name) from exc
            audit.report.identifiability.plot = plot

    def _verify(self, audit: Audit, settings: cfg.Settings) -> None:
        from rgap_audit.tolerances import VERIFY_SEEDS

        make_criterion, settle, verify = _stage("make_criterion"), _stage("settle"), _stage("verify")

        req = self.request
        seeds = req.verify_seeds or settings.verify_seeds or VERIFY_SEEDS
        crit = make_criterion(req.leak_psnr or settings.leak_psnr, req.leak_ssim or settings.leak_ssim)
        result = verify(
            audit, input=req.input, weights=req.weights, save_images=req.save_images, debug=req.debug, seeds=seeds, criterion=crit
        )
        report = audit.report
        report.verification = result
        report.verdict = settle(report.verdict, result, report.batch_size)

    # ------------------------------------------------------------------ rules
    def _findings(self, reports: list[ModelReport], settings: cfg.Settings) -> list[Finding]:
        """Rules over one file's reports with that file's selection, then inline suppressions."""
        req = self.request
        select = req.select if req.select is not None else settings.select
        ignore = req.ignore if req.ignore is not None else list(settings.ignore)
        ignore = [*ignore, *settings.file_ignores]
        extend = [*settings.extend_select, *req.extend_select]
        try:
            found = evaluate(reports, self.result.rules or load_rules(), select=select, ignore=ignore, extend_select=extend)
        except AuditError as err:  # an unknown code in the configuration (the command line was checked first)
            err.file = err.file or settings.path
            raise
        return list(apply_suppressions(found))
