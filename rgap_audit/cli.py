"""The `rgap-audit` command: audit model files, list and explain rules, exit codes for CI.

    rgap-audit PATH[:NAME] ...   audit the models of each file (or the named one)
    rgap-audit rules             list the rules
    rgap-audit rule CODE         explain one rule
    rgap-audit render REPORT.json -o REPORT.html   the html page of an archived JSON report

Exit codes: 0 no unsuppressed finding at or above --fail-on; 1 such findings; 2 usage, config,
load, trace or verification errors (every broken file or model is reported as one line on stderr,
`file:line: model: error: cause`, the other files are still audited). No traceback without --debug.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

from rgap_audit import __version__
from rgap_audit.choices import DEFAULT_FAIL_ON, DEFAULT_MEMORY_BUDGET_MB, FORMATS, LOSSES, SEVERITIES
from rgap_audit.errors import AuditError
from rgap_audit.records import ErrorRecord

if TYPE_CHECKING:  # pragma: no cover
    from rgap_audit.pipeline import Request

# the audit's modules import torch: they are imported when an audit runs, so that `rgap-audit rules`,
# `rule CODE` and --help start in a fraction of a second


EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns its exit code."""

    def error(self, message: str) -> Any:
        raise _UsageError(message)


def _codes(text: str) -> list[str]:
    return [c.strip().upper() for c in text.split(",") if c.strip()]


def _shape(text: str) -> tuple[int, ...]:
    from rgap_audit.targets import parse_shape

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


def _batch_sizes(text: str) -> list[int]:
    """`1,2,4,8` or `1..64` (doubling from the first to at most the last): distinct positive sizes, in order."""
    text = text.strip()
    if ".." in text:
        lo_s, _, hi_s = text.partition("..")
        lo, hi = _positive_int(lo_s.strip()), _positive_int(hi_s.strip())
        if hi < lo:
            raise argparse.ArgumentTypeError(f"empty range {text!r}: {hi} < {lo}")
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 2
        return sizes
    sizes = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4 or 1..64, got {text!r}")
    return list(dict.fromkeys(sizes))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The audit command's arguments (the `rules` / `rule CODE` subcommands are dispatched before)."""
    p = _Parser(
        prog="rgap-audit",
        description="Privacy-risk linter for PyTorch model architectures (R-GAP rank analysis of gradient leakage). "
        "Also: `rgap-audit rules` lists the rules, `rgap-audit rule CODE` explains one, "
        "`rgap-audit render REPORT.json -o REPORT.html` renders a JSON report as a page. "
        "Auditing executes the model file, as importing it would.",
    )
    p.add_argument("targets", nargs="*", metavar="PATH[:NAME]", help="model files; :NAME audits one model of the file")
    p.add_argument("--version", action="version", version=f"rgap-audit {__version__}")
    out = p.add_argument_group("output")
    out.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: `format` in the config, else table on a terminal and concise otherwise, "
        "e.g. in pre-commit and CI; with --output, chosen from the file extension: .json, .sarif, .html)",
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
    ana.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        metavar="B1,B2,..|LO..HI",
        help="one audit per batch size (a comma list, or LO..HI: LO, 2 LO, 4 LO, ... up to HI): a table of the verdict under "
        "each attacker, the input directions undetermined and the time per size (default format: table)",
    )
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
        "--cache-dir",
        metavar="DIR",
        help="keep results here between runs (default: `cache-dir` in the config, else .rgap_audit_cache; env RGAP_AUDIT_CACHE_DIR)",
    )
    ana.add_argument("--no-cache", action="store_true", help="neither read nor write the results cache (env RGAP_AUDIT_NO_CACHE=1)")
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
        "--verify-seeds",
        type=_positive_int,
        metavar="N",
        help="--verify runs the attack on N inputs: the audited one, then seeded random ones (default: config, else 3)",
    )
    ver.add_argument(
        "--leak-psnr",
        type=_positive_float,
        metavar="DB",
        help="--verify counts a reconstruction at PSNR >= DB as a privacy leak (default: config, else 30)",
    )
    ver.add_argument(
        "--leak-ssim",
        type=_unit_float,
        metavar="S",
        help="--verify also counts a reconstruction at SSIM >= S as a privacy leak (default: config, else 0.9)",
    )
    ver.add_argument(
        "--save-images",
        metavar="DIR",
        help="--verify writes original / reconstruction PNGs here; --identifiability its singular spectrum; --defences its curves",
    )
    dfn = p.add_argument_group("defences (measure what stops the attack)")
    dfn.add_argument(
        "--defences",
        nargs="?",
        const="all",
        metavar="PARTS",
        help="measure the noise (DP-SGD), compression, batch size and architecture edit that stop the closed-form attack "
        "(comma list of noise, compression, batch, architecture; default all)",
    )
    dfn.add_argument("--clip-norm", type=_positive_float, metavar="C", help="--defences: per-sample clipping norm (default: the instance's gradient norm)")
    dfn.add_argument("--dp-rounds", type=_positive_int, metavar="T", help="--defences: rounds for the epsilon of T releases (default 100)")
    dfn.add_argument("--dp-sample-rate", type=_unit_float, metavar="Q", help="--defences: client sampling rate per round (default 0.01)")
    dfn.add_argument("--dp-delta", type=_unit_float, metavar="DELTA", help="--defences: delta of (epsilon, delta) (default 1e-5)")
    dfn.add_argument(
        "--defence-threshold", type=_positive_float, metavar="E", help="--defences: the attack is stopped above this relative error (default 0.5)"
    )
    return p


def default_format(output: str | None) -> str:
    """table for a person at a terminal; concise for pipes, pre-commit and CI; by extension for --output."""
    if output:
        lower = output.lower()
        if lower.endswith(".json") and not lower.endswith(".sarif.json"):
            return "json"
        if lower.endswith((".sarif", ".sarif.json")):
            return "sarif"
        if lower.endswith((".html", ".htm")):
            return "html"
        return "concise"
    if os.environ.get("PRE_COMMIT") or os.environ.get("CI"):
        return "concise"
    try:
        return "table" if sys.stdout.isatty() else "concise"
    except (AttributeError, ValueError):
        return "concise"


class _Errors:
    """Prints each error once, as one line on stderr, as it happens; keeps them for the report (every
    format carries them: json `errors`, sarif notifications, github ::error, the summary line)."""

    def __init__(self, debug: bool):
        self.debug = debug
        self.count = 0
        self.seen: set[str] = set()
        self.items: list[AuditError] = []

    def __call__(self, err: AuditError, stage: str | None = None) -> None:
        if self.debug:
            traceback.print_exception(err.__cause__ or err, file=sys.stderr)
        err.stage = err.stage or stage
        line = err.one_line() if err.file else f"rgap-audit: error: {' '.join(str(err.cause).split())}"
        self.count += 1
        self.items.append(err)
        if line not in self.seen:  # one broken pyproject shared by many files: say it once
            self.seen.add(line)
            print(line, file=sys.stderr, flush=True)

    def records(self) -> list[ErrorRecord]:
        """The errors as records.ErrorRecord, each once, in the order met (one broken pyproject shared by
        many files is one error)."""
        out: list[ErrorRecord] = []
        for err in self.items:
            rec = err.record()
            if rec not in out:
                out.append(rec)
        return out


def _flatten(lists: list[list[str]] | None) -> list[str] | None:
    if lists is None:
        return None
    return [c for part in lists for c in part]


def _request(args: argparse.Namespace) -> Request:
    from rgap_audit.pipeline import Request

    return Request(
        targets=list(args.targets),
        select=_flatten(args.select),
        ignore=_flatten(args.ignore),
        extend_select=_flatten(args.extend_select) or [],
        fail_on=args.fail_on,
        input_shape=args.input_shape,
        batch_size=args.batch_size,
        batch_sizes=args.batch_sizes,
        loss=args.loss,
        seed=args.seed,
        memory_budget_mb=args.memory_budget_mb,
        identifiability=args.identifiability,
        no_config=args.no_config,
        allow_no_models=args.allow_no_models,
        verify=args.verify,
        input=args.input,
        weights=args.weights,
        save_images=args.save_images,
        verify_seeds=args.verify_seeds,
        leak_psnr=args.leak_psnr,
        leak_ssim=args.leak_ssim,
        debug=args.debug,
        defences=_defence_options(args),
    )


def _defence_options(args: argparse.Namespace) -> Any:
    """--defences and its knobs as DefenceOptions (None without --defences); bad part names raise ValueError."""
    if not args.defences:
        return None
    from rgap_audit.defence import PARTS, DefenceOptions

    parts = PARTS if args.defences == "all" else tuple(p.strip() for p in args.defences.split(",") if p.strip())
    opts = DefenceOptions(parts=parts)
    for attr, value in (("clip_norm", args.clip_norm), ("rounds", args.dp_rounds), ("sample_rate", args.dp_sample_rate),
                        ("delta", args.dp_delta), ("threshold", args.defence_threshold)):
        if value is not None:
            setattr(opts, attr, value)
    return opts


def _audit(args: argparse.Namespace) -> int:
    from rgap_audit import config as cfg
    from rgap_audit.formats import render
    from rgap_audit.pipeline import Pipeline, internal_error

    if not args.targets:
        print("rgap-audit: error: no files given (usage: rgap-audit PATH[:NAME] ...; see --help)", file=sys.stderr)
        return EXIT_ERROR
    if (args.input or args.weights) and not args.verify:
        print("rgap-audit: error: --input and --weights need --verify", file=sys.stderr)
        return EXIT_ERROR
    if (args.verify_seeds or args.leak_psnr or args.leak_ssim) and not args.verify:
        print("rgap-audit: error: --verify-seeds, --leak-psnr and --leak-ssim need --verify", file=sys.stderr)
        return EXIT_ERROR
    if args.save_images and not (args.verify or args.identifiability or args.defences):
        print("rgap-audit: error: --save-images needs --verify, --identifiability or --defences", file=sys.stderr)
        return EXIT_ERROR
    knobs = (args.clip_norm, args.dp_rounds, args.dp_sample_rate, args.dp_delta, args.defence_threshold)
    if any(k is not None for k in knobs) and not args.defences:
        print("rgap-audit: error: --clip-norm, --dp-rounds, --dp-sample-rate, --dp-delta and --defence-threshold need --defences", file=sys.stderr)
        return EXIT_ERROR
    if args.defences and args.defences != "all":
        from rgap_audit.defence import PARTS

        bad = [p for p in args.defences.split(",") if p.strip() not in PARTS]
        if bad:
            print(f"rgap-audit: error: --defences: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}", file=sys.stderr)
            return EXIT_ERROR
    if args.batch_size and args.batch_sizes:
        print("rgap-audit: error: give --batch-size or --batch-sizes, not both", file=sys.stderr)
        return EXIT_ERROR
    errors = _Errors(args.debug)
    pipeline = Pipeline(_request(args), errors)
    if not pipeline.check_selection():
        return EXIT_ERROR
    project = cfg.Settings()
    if not args.no_config:
        try:
            project = cfg.settings_for(os.getcwd())
        except AuditError as err:
            errors(err, "config")
    fmt = args.format or project.format or ("table" if args.batch_sizes and not args.output else default_format(args.output))
    pipeline.request.cache_dir = cache_folder(args, project)
    if (fmt == "html" or args.save_images) and not _figures_available(errors, fmt):
        return EXIT_ERROR
    result = pipeline.run()
    if not result.reports and not errors.count and fmt in ("concise", "table", "github"):
        return EXIT_OK  # nothing audited, nothing wrong (--allow-no-models); json/sarif still get a (valid, empty) document
    code = EXIT_ERROR if errors.count else (EXIT_FINDINGS if result.failed else EXIT_OK)
    try:
        text = render(
            fmt, result.reports, result.findings, show_suppressed=args.show_suppressed, rules=result.rules, cwd=os.getcwd(),
            exit_code=code, errors=errors.records(),
        )
    except AuditError as err:
        errors(err, "report")
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        errors(internal_error(exc, "<report>", None), "report")
        return EXIT_ERROR
    if args.output:
        try:
            os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") or not text else text + "\n")
        except OSError as exc:
            errors(AuditError(f"cannot write the report: {exc.strerror or exc}", args.output), "report")
    elif text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    if errors.count:
        return EXIT_ERROR
    return code


def cache_folder(args: argparse.Namespace, project: Any) -> str | None:
    """The results cache of this run (rgap_audit.cache): --cache-dir, RGAP_AUDIT_CACHE_DIR, `cache-dir` in the
    working directory's configuration, else .rgap_audit_cache; None with --no-cache or RGAP_AUDIT_NO_CACHE."""
    from rgap_audit.cache import DEFAULT_DIR

    if args.no_cache or os.environ.get("RGAP_AUDIT_NO_CACHE", "").strip() not in ("", "0"):
        return None
    return args.cache_dir or os.environ.get("RGAP_AUDIT_CACHE_DIR") or getattr(project, "cache_dir", None) or DEFAULT_DIR


def _figures_available(errors: _Errors, fmt: str) -> bool:
    """The html format and --save-images draw with matplotlib (the `report` extra): say so before any audit runs."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    what = "--format html" if fmt == "html" else "--save-images"
    errors(AuditError(f"{what} draws its figures with matplotlib, which is not installed: pip install 'rgap-audit[report]'"))
    return False


def _render_command(argv: list[str]) -> int:
    """`rgap-audit render REPORT.json [-o OUT.html]`: the html page of a JSON report, from that document alone."""
    import json

    p = _Parser(prog="rgap-audit render", description="Render a JSON report (--format json) as one self-contained html page.")
    p.add_argument("report", metavar="REPORT.json", help="a report written by --format json")
    p.add_argument("--output", "-o", metavar="FILE", help="write the page to FILE instead of stdout")
    args = p.parse_args(argv)
    try:
        with open(args.report, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise AuditError(f"cannot read the report: {exc.strerror or exc}", args.report) from exc
    except json.JSONDecodeError as exc:
        raise AuditError(f"not a JSON report: {exc.msg} (column {exc.colno})", args.report, line=exc.lineno) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or "schema_version" not in doc:
        raise AuditError("not an rgap-audit JSON report: no schema_version and models list", args.report)
    from rgap_audit.formats.htmlreport import render_html

    text = render_html(doc)
    if args.output:
        try:
            os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise AuditError(f"cannot write the page: {exc.strerror or exc}", args.output) from exc
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _rules_command(argv: list[str]) -> int:
    p = _Parser(prog="rgap-audit rules", description="List the rules rgap-audit checks.")
    p.parse_args(argv)
    from rgap_audit import docs

    sys.stdout.write(docs.list_rules_text().rstrip("\n") + "\n")
    return EXIT_OK


def _rule_command(argv: list[str]) -> int:
    p = _Parser(prog="rgap-audit rule", description="Explain one rule: what it flags, why, how to fix it.")
    p.add_argument("code", help="a rule code, e.g. RGAP101")
    args = p.parse_args(argv)
    from rgap_audit import docs

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
        if argv and argv[0] == "render":
            return _render_command(argv[1:])
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
