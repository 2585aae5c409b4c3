"""Make docs/report-screenshot.png, the README's picture of the html report.

    python docs/make_screenshot.py [--keep DIR]

Runs `rgap-audit examples/paper_nets.py --verify --input sample` (CNN6-d first: its deficit and its
recovery by the projected variant are the page's most telling part), renders the page from the JSON
report with `rgap-audit render`, opens it in headless Chromium with the browser harness of the tests
(tests/browser.py) and keeps the top of the page, reduced to 256 colours to keep the file small.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser import find_chromium, load  # noqa: E402

from rgap_audit import cli  # noqa: E402

WIDTH, HEIGHT = 1280, 2300


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", metavar="DIR", help="keep the JSON report and the page in DIR")
    ap.add_argument("--output", default=str(ROOT / "docs" / "report-screenshot.png"))
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("headless Chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="rgap-shot-"))
    work.mkdir(parents=True, exist_ok=True)
    nets = "examples/paper_nets.py"
    js, page = work / "report.json", work / "report.html"
    code = cli.main([f"{nets}:CNN6-d", f"{nets}:CNN6", f"{nets}:FCN3", "--verify", "--input", "sample", "--format", "json", "-o", str(js)])
    if code not in (0, 1) or cli.main(["render", str(js), "-o", str(page)]) != 0:
        return 2
    shot = load(chromium, page, work / "browser", width=WIDTH, height=HEIGHT).screenshot
    from PIL import Image

    with Image.open(shot) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size // 1024} KiB) from {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
