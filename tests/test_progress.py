"""Progress on stderr (rgap_audit.progress): drawn only for a person at a terminal, never under
pre-commit or CI, never on stdout.

Oracles: a real pseudo-terminal as the CLI's stderr (what a user sees), stdout parsed as the JSON
report; a recording stream and a fake clock for the meter's own behaviour.
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from rgap_audit import progress

ROOT = Path(__file__).resolve().parent.parent


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wanted_only_at_a_terminal_outside_ci_and_pre_commit():
    assert progress.wanted(_Tty(), {}) is True
    assert progress.wanted(_Tty(), {"CI": "true"}) is False
    assert progress.wanted(_Tty(), {"PRE_COMMIT": "1"}) is False
    assert progress.wanted(io.StringIO(), {}) is False


def test_meter_counts_throttles_and_clears():
    now = [0.0]
    out = _Tty()
    meter = progress.Meter(out, rate=10.0, clock=lambda: now[0]).start("CNN6", {"walk": 3})
    with progress.reporting(meter):
        progress.step("walk", "conv6")
        now[0] = 0.01
        progress.step("walk", "conv5")  # within 0.1 s of the last redraw: not drawn
        now[0] = 0.02
        progress.step("walk", "conv4")  # the last unit is always drawn
        progress.step("identifiability", "columns", 64, 3072)
        now[0] = 0.03
        progress.step("identifiability", "columns", 128, 3072)  # the same stage within 0.1 s: not drawn
    progress.step("walk", "after")  # no sink installed: nothing
    meter.clear()
    assert out.getvalue() == (
        "\rrgap-audit: CNN6: walk 1/3 conv6\x1b[K"  # conv5 throttled
        "\rrgap-audit: CNN6: walk 3/3 conv4\x1b[K"
        "\rrgap-audit: CNN6: identifiability 64/3072 columns\x1b[K"  # a new stage
        "\r\x1b[K"  # erased
    )


def _run_with_tty_stderr(env: dict[str, str]) -> tuple[str, str]:
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "rgap_audit", "examples/paper_nets.py:FCN3", "--verify", "--format", "json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    return out.decode(), b"".join(chunks).decode(errors="replace")


def test_cli_draws_progress_on_a_terminal_and_keeps_stdout_clean():
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PRE_COMMIT")}
    env["PYTHONPATH"] = str(ROOT)
    out, tty = _run_with_tty_stderr(env)
    doc = json.loads(out)  # stdout is the report alone
    assert doc["models"][0]["model"] == "FCN3" and "\r" not in out and "rgap-audit: FCN3" not in out
    assert "rgap-audit: FCN3: walk 6/6" in tty and "rgap-audit: FCN3: attack" in tty
    assert tty.endswith("\r\x1b[K")  # the line is erased when the model is done


def test_no_progress_under_ci_or_pre_commit_even_at_a_terminal(monkeypatch, capsys):
    from rgap_audit import cli

    for var in ("CI", "PRE_COMMIT"):
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("PRE_COMMIT", raising=False)
        monkeypatch.setenv(var, "1")
        tty = _Tty()
        monkeypatch.setattr(sys, "stderr", tty)
        assert cli.main(["examples/paper_nets.py:FCN3", "--format", "json"]) == 1
        assert tty.getvalue() == ""
        assert json.loads(capsys.readouterr().out)["models"][0]["model"] == "FCN3"
    monkeypatch.delenv("PRE_COMMIT")
    tty = _Tty()  # the same in-process run at a terminal does draw: the check above can fail
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(["examples/paper_nets.py:FCN3", "--format", "json"]) == 1
    assert "rgap-audit: FCN3: walk 6/6" in tty.getvalue()
