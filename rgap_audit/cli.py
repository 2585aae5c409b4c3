"""The `rgap-audit` command: audit model files, list and explain rules, exit codes for CI.

    rgap-audit PATH[:NAME] ...   audit the models of each file (or the named one)
    rgap-audit rules             list the rules
    rgap-audit rule CODE         explain one rule

Exit codes: 0 no unsuppressed finding at or above --fail-on; 1 such findings; 2 usage, config,
load, trace or verification errors (every broken file or model is reported as one line on stderr,
`file:line: model: error: cause`, the other files are still audited). No traceback without --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from rgap_audit import __version__
from rgap_audit.errors import AuditError

FORMATS = ("concise", "table", "json", "sarif", "github")
SEVERITIES = ("info", "warning", "error")
LOSSES = ("logistic", "cross-entropy")
DEFAULT_FAIL_ON = "warning"
DEFAULT_MEMORY_BUDGET_MB = 4096.0  # AuditOptions' default

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns its exit code."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(message)


def _codes(text: str) -> list[str]:
    return [c.strip().upper() for c in text.split(",") if c.strip()]


def _shape(text: str) -> tuple[int, ...]:
    from rgap_audit.loader import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The audit command's arguments (the `rules` / `rule CODE` subcommands are dispatched before)."""
    p = _Parser(
        prog="rgap-audit",
        description="Privacy-risk linter for PyTorch model architectures (R-GAP rank analysis of gradient leakage). "
        "Also: `rgap-audit rules` lists the rules, `rgap-audit rule CODE` explains one. "
        "Auditing executes the model file, as importing it would.",
    )
    p.add_argument("targets", nargs="*", metavar="PATH[:NAME]", help="model files; :NAME audits one model of the file")
    p.add_argument("--version", action="version", version=f"rgap-audit {__version__}")
    out = p.add_argument_group("output")
    out.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: `format` in the config, else table on a terminal and concise otherwise, "
        "e.g. in pre-commit and CI; with --output, chosen from the file extension: .json, .sarif)",
    )
    out.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout")
    out.add_argument("--show-suppressed", action="store_true", help="also print findings suppressed by `# rgap: ignore[...]`")
    out.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    sel = p.add_argument_group("rules")
    sel.add_argument("--select", type=_codes, action="append", metavar="CODES", help="only these rule codes or prefixes (comma list)")
    sel.add_argument("--ignore", type=_codes, action="append", metavar="CODES", help="skip these rule codes or prefixes (comma list)")
    sel.add_argument("--extend-select", type=_codes, action="append", metavar="CODES", help="add codes to the selection (comma list)")
    sel.add_argument("--fail-on", choices=SEVERITIES, help=f"lowest severity that makes the exit code 1 (default: {DEFAULT_FAIL_ON})")
    ana = p.add_argument_group("analysis")
    ana.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="one sample's input shape, for every model audited (overrides declarations)")
    ana.add_argument("--batch-size", type=_positive_int, metavar="B", help="samples that share one gradient (default: declaration, config, else 1)")
    ana.add_argument("--loss", choices=LOSSES, help="training loss (default: declaration, config, else logistic for one output, cross-entropy otherwise)")
    ana.add_argument("--seed", type=int, help="seed of the random instance (default 0)")
    ana.add_argument(
        "--memory-budget-mb",
        type=_positive_float,
        metavar="MB",
        help=f"refuse models whose audit is estimated to need more memory (default {DEFAULT_MEMORY_BUDGET_MB:.0f})",
    )
    ana.add_argument("--identifiability", action="store_true", help="also the whole-network identifiability (Jacobian rank) for small inputs")
    ana.add_argument("--no-config", action="store_true", help="ignore [tool.rgap-audit] in pyproject.toml")
    ana.add_argument(
        "--allow-no-models",
        action="store_true",
        help="skip files that define no model instead of failing (for pre-commit and CI runs over many files)",
    )
    ver = p.add_argument_group("verification (run the R-GAP attack)")
    ver.add_argument("--verify", action="store_true", help="reconstruct the input in closed form and report the errors")
    ver.add_argument("--input", metavar="FILE", help="--verify on this input (a saved tensor or an image) instead of a random one")
    ver.add_argument("--weights", metavar="CKPT", help="--verify with these weights (loaded with weights_only=True)")
    ver.add_argument(
        "--save-images",
        metavar="DIR",
        help="--verify writes original / reconstruction PNGs here; --identifiability its singular spectrum",
    )
    return p


def split_target(target: str) -> tuple[str, str | None]:
    """`path.py:Name` -> (path.py, Name); a path that exists as written is never split."""
    if os.path.exists(target) or ":" not in target:
        return target, None
    path, _, name = target.rpartition(":")
    if not path or not name or "/" in name or "\\" in name:
        return target, None
    return path, name


def default_format(output: str | None) -> str:
    """table for a person at a terminal; concise for pipes, pre-commit and CI; by extension for --output."""
    if output:
        lower = output.lower()
        if lower.endswith(".json") and not lower.endswith(".sarif.json"):
            return "json"
        if lower.endswith((".sarif", ".sarif.json")):
            return "sarif"
        return "concise"
    if os.environ.get("PRE_COMMIT") or os.environ.get("CI"):
        return "concise"
    try:
        return "table" if sys.stdout.isatty() else "concise"
    except (AttributeError, ValueError):
        return "concise"


class _Run:
    """One audit run: collects reports, findings and errors; errors never stop the other files."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.errors = 0
        self.seen_errors: set[str] = set()
        self.fmt: str | None = None  # known once the configuration of the working directory is read

    def error(self, err: AuditError, model: str | None = None) -> None:
        if err.model is None and model is not None:
            err.model = model
        if self.args.debug:
            traceback.print_exception(err.__cause__ or err, file=sys.stderr)
        line = err.one_line() if err.file else f"rgap-audit: error: {' '.join(str(err.cause).split())}"
        self.errors += 1
        if line not in self.seen_errors:  # one broken pyproject shared by many files: say it once
            self.seen_errors.add(line)
            print(line, file=sys.stderr, flush=True)
            if self.fmt == "github" and err.file and not self.args.output:
                self._annotate(err)

    @staticmethod
    def _annotate(err: AuditError) -> None:
        """With --format github a broken file also becomes an error annotation in the workflow."""
        def escape_data(text: str) -> str:
            return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

        def escape_property(text: str) -> str:
            return escape_data(text).replace(":", "%3A").replace(",", "%2C")

        props = f"file={escape_property(err.file or '')}" + (f",line={err.line}" if err.line else "") + ",title=rgap-audit"
        who = f"{err.model}: " if err.model else ""
        print(f"::error {props}::{escape_data(who + ' '.join(str(err.cause).split()))}", flush=True)

    def internal(self, exc: BaseException, file: str, model: str | None) -> None:
        """A bug of ours: still one line (with --debug, the traceback)."""
        text = " ".join(str(exc).split())
        err = AuditError(f"internal error: {type(exc).__name__}: {text} (re-run with --debug for the traceback)", file, model)
        err.__cause__ = exc
        self.error(err)


@contextlib.contextmanager
def _captured(debug: bool) -> Iterator[None]:
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


def _flatten(lists: list[list[str]] | None) -> list[str] | None:
    if lists is None:
        return None
    return [c for part in lists for c in part]


def _module(name: str, feature: str) -> Any:
    """Import one of the stages; a missing stage is a one-line error, not a traceback."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
            raise AuditError(f"{feature} is not available in this build ({name} missing)") from exc
        raise AuditError(f"{feature} cannot be imported: {type(exc).__name__}: {exc}") from exc
    except ImportError as exc:
        raise AuditError(f"{feature} cannot be imported: {type(exc).__name__}: {exc}") from exc


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a colleague's function with only the keyword arguments it accepts (API drift safety)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _group_targets(targets: list[str]) -> dict[str, list[str] | None]:
    """path -> names to audit (None: all the file's models); repeated paths are imported once."""
    from rgap_audit.loader import display_path

    groups: dict[str, list[str] | None] = {}
    for target in targets:
        path, name = split_target(target)
        path = display_path(path)
        if path in groups and groups[path] is None:
            continue
        if name is None:
            groups[path] = None
        else:
            groups.setdefault(path, [])
            groups[path].append(name)  # type: ignore[union-attr]
    return groups


def _audit(args: argparse.Namespace) -> int:
    from rgap_audit import config as cfg
    from rgap_audit.loader import iter_models, no_network
    from rgap_audit.options import AuditOptions

    run = _Run(args)
    if not args.targets:
        print("rgap-audit: error: no files given (usage: rgap-audit PATH[:NAME] ...; see --help)", file=sys.stderr)
        return EXIT_ERROR
    if (args.input or args.weights) and not args.verify:
        print("rgap-audit: error: --input and --weights need --verify", file=sys.stderr)
        return EXIT_ERROR
    if args.save_images and not (args.verify or args.identifiability):
        print("rgap-audit: error: --save-images needs --verify or --identifiability", file=sys.stderr)
        return EXIT_ERROR

    stages: dict[str, Any] = {}

    def stage(key: str) -> Any:
        """The analysis and rule stages, imported when the first model needs them."""
        if key not in stages:
            if key == "rules":
                mod = _module("rgap_audit.rules", "the rule engine")
                stages[key] = (mod, mod.load_rules())
            else:
                stages[key] = _module("rgap_audit.analysis", "the analysis")
        return stages[key]

    try:  # unknown codes on the command line are usage errors, found before any model is loaded
        rules_mod, all_rules = stage("rules")
        _call(
            rules_mod.select_rules,
            all_rules,
            select=_flatten(args.select),
            ignore=_flatten(args.ignore),
            extend_select=_flatten(args.extend_select),
        )
    except AuditError as err:
        run.error(err)
        return EXIT_ERROR

    project: cfg.Settings = cfg.Settings()
    if not args.no_config:
        try:
            project = cfg.settings_for(os.getcwd())
        except AuditError as err:
            run.error(err)
    fmt = args.format or project.format or default_format(args.output)
    run.fmt = fmt

    reports: list[Any] = []
    findings: list[Any] = []
    failed = False
    for path, names in _group_targets(args.targets).items():
        settings = cfg.Settings()
        if not args.no_config:
            try:
                settings = cfg.settings_for(path)
            except AuditError as err:
                run.error(err, None)
                continue
        options = AuditOptions(
            batch_size=args.batch_size,
            loss=args.loss,
            seed=args.seed if args.seed is not None else (settings.seed or 0),
            input_shape=args.input_shape,
            memory_budget_mb=args.memory_budget_mb or settings.memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB,
            debug=args.debug,
        )
        file_reports = []
        items = iter_models(
            path,
            names,
            options,
            fallback=settings.model_defaults(),
            per_model=settings.models,
            allow_empty=args.allow_no_models,
        )
        while True:
            try:
                with _captured(args.debug):
                    item = next(items)
            except StopIteration:
                break
            except Exception as exc:  # a bug in the loader: report, go on with the next file
                if args.debug:
                    raise
                run.internal(exc, path, None)
                break
            if isinstance(item, AuditError):
                run.error(item)
                continue
            try:
                analysis = stage("analysis")
            except AuditError as err:
                err.file = err.file or item.file
                run.error(err, item.name)
                continue
            report = _audit_one(run, analysis, item, options, no_network)
            if report is not None:
                file_reports.append(report)
            del item
        if not file_reports:
            continue
        reports.extend(file_reports)
        try:
            rules_mod, all_rules = stage("rules")
            file_findings = _findings(rules_mod, all_rules, file_reports, settings, args)
        except AuditError as err:
            run.error(err)
            continue
        findings.extend(file_findings)
        fail_on = args.fail_on or settings.fail_on or DEFAULT_FAIL_ON
        active = [f for f in file_findings if not getattr(f, "suppressed", False)]
        if rules_mod.fails(active, fail_on):
            failed = True

    if not reports and fmt in ("concise", "table", "github"):
        return EXIT_ERROR if run.errors else EXIT_OK  # nothing to print; json/sarif still get a (valid, empty) document for CI
    try:
        formats = _module("rgap_audit.formats", "output formats")
        rules_for_sarif = stages["rules"][1] if "rules" in stages else None
        text = _call(formats.render, fmt, reports, findings, show_suppressed=args.show_suppressed, rules=rules_for_sarif, cwd=os.getcwd())
    except AuditError as err:
        run.error(err)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        run.internal(exc, "<report>", None)
        return EXIT_ERROR
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") or not text else text + "\n")
        except OSError as exc:
            run.error(AuditError(f"cannot write the report: {exc.strerror or exc}", args.output))
    elif text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    if run.errors:
        return EXIT_ERROR
    return EXIT_FINDINGS if failed else EXIT_OK


def _audit_one(run: _Run, analysis: Any, loaded: Any, options: Any, no_network: Callable[[], Any]) -> Any:
    """Analysis (+ verification, identifiability) of one loaded model; None after an error."""
    args = run.args
    try:
        with no_network(), _captured(args.debug):
            report = analysis.audit_loaded(loaded, options)
            if args.identifiability:
                _identifiability(loaded, options, report, args.save_images)
            if args.verify:
                attack = _module("rgap_audit.attack", "--verify")
                _call(attack.verify, loaded, options, report, input=args.input, weights=args.weights, save_images=args.save_images)
        return report
    except AuditError as err:
        if err.file is None:
            err.file = loaded.file
        run.error(err, loaded.name)
    except Exception as exc:
        if args.debug:
            raise
        run.internal(exc, loaded.file, loaded.name)
    return None


def _identifiability(loaded: Any, options: Any, report: Any, images: str | None) -> None:
    """--identifiability: rank and spectrum of d(gradient)/d(input) on the audited instance.

    The result goes to `report.identifiability` when the report has that field, else its summary
    becomes a report warning; with --save-images DIR the spectrum is plotted to DIR/MODEL-spectrum.png.
    """
    ident = _module("rgap_audit.identifiability", "--identifiability")
    plot = None
    if images:
        os.makedirs(images, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in loaded.name)
        plot = os.path.join(images, f"{safe}-spectrum.png")
    try:
        result = _call(
            ident.identifiability,
            loaded.module,
            tuple(report.input_shape),
            report.loss,
            batch_size=report.batch_size,
            seed=options.seed,
            plot=plot,
        )
    except (ValueError, RuntimeError, MemoryError) as exc:
        raise AuditError(f"identifiability failed: {type(exc).__name__}: {' '.join(str(exc).split())}", loaded.file, loaded.name) from exc
    if hasattr(report, "identifiability"):
        report.identifiability = result
    else:
        report.warnings.append(f"identifiability: {result.get('summary', '')}")


def _findings(rules_mod: Any, all_rules: Any, reports: list[Any], settings: Any, args: argparse.Namespace) -> list[Any]:
    """Rules over one file's reports with that file's selection, then inline suppressions."""
    select = _flatten(args.select) if args.select is not None else settings.select
    ignore = _flatten(args.ignore) if args.ignore is not None else list(settings.ignore)
    ignore = [*ignore, *settings.file_ignores]
    extend = [*settings.extend_select, *(_flatten(args.extend_select) or [])]
    try:
        found = _call(rules_mod.evaluate, reports, all_rules, select=select, ignore=ignore, extend_select=extend)
    except AuditError as err:  # an unknown code in the configuration (the command line was checked first)
        err.file = err.file or settings.path
        raise
    suppress = _module("rgap_audit.suppress", "suppression comments")
    return list(suppress.apply(found))


def _rules_command(argv: list[str]) -> int:
    p = _Parser(prog="rgap-audit rules", description="List the rules rgap-audit checks.")
    p.parse_args(argv)
    docs = _module("rgap_audit.docs", "rule documentation")
    sys.stdout.write(docs.list_rules_text().rstrip("\n") + "\n")
    return EXIT_OK


def _rule_command(argv: list[str]) -> int:
    p = _Parser(prog="rgap-audit rule", description="Explain one rule: what it flags, why, how to fix it.")
    p.add_argument("code", help="a rule code, e.g. RGAP101")
    args = p.parse_args(argv)
    docs = _module("rgap_audit.docs", "rule documentation")
    try:
        text = docs.explain_rule_text(args.code.upper())
    except (KeyError, LookupError, ValueError) as exc:
        raise AuditError(f"unknown rule {args.code!r} (see `rgap-audit rules`)") from exc
    if not text:
        raise AuditError(f"unknown rule {args.code!r} (see `rgap-audit rules`)")
    sys.stdout.write(text.rstrip("\n") + "\n")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of `python -m rgap_audit`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "rules":
            return _rules_command(argv[1:])
        if argv and argv[0] == "rule":
            return _rule_command(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        return _audit(args)
    except _UsageError as exc:
        print(f"rgap-audit: error: {exc} (see --help)", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except AuditError as err:
        if debug:
            traceback.print_exc()
        print(err.one_line() if err.file else f"rgap-audit: error: {err.cause}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rgap-audit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if debug:
            raise
        print(f"rgap-audit: error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (re-run with --debug)", file=sys.stderr)
        return EXIT_ERROR
