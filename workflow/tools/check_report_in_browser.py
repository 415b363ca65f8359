"""Open the HTML report in headless Chromium and check it as a reader would see it.

Checks that the page renders, that every <img> decodes (naturalWidth > 0) and that every link
resolves (in-page anchors exist; no link leaves the file), and writes a screenshot of the top of the
report as a reader at a 1400 px wide window sees it (1400 x 900 px PNG; default beside the report,
``<report>.top.png``; its path is printed in the JSON line as ``screenshot``). Exit code 0 when all
hold, 1 otherwise, with one line per problem.

    python workflow/tools/check_report_in_browser.py results/report.html [--screenshot out.png]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs inside the page after load and writes its findings into the DOM for --dump-dom to return.
PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  const dangling = links.filter(h => h.startsWith('#') ? !document.getElementById(h.slice(1)) : true);
  const out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({images: imgs.length, broken, links: links.length, dangling,
                                    height: document.body.scrollHeight});
  document.body.appendChild(out);
});
</script>
"""

# The reader this report is laid out for: a 1400 px wide window; the top screen is what they see first.
WINDOW = (1400, 900)

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")


def check(report: Path, screenshot: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report_probe.html"
        probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        profile = ["--user-data-dir=" + str(Path(tmp) / "profile")]
        dom = subprocess.run(
            [chromium(), *FLAGS, *profile, "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        ).stdout
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [chromium(), *FLAGS, *profile, f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
             f"--screenshot={screenshot.resolve()}", report.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, flags=re.S)
    if not found:
        return {"rendered": False}
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    result["rendered"] = result["height"] > 0
    result["screenshot"] = str(screenshot)
    result["screenshot_size"] = png_size(screenshot)
    return result


def png_size(path: Path) -> list[int] | None:
    """[width, height] from a PNG's IHDR chunk; None when the file is missing or not a PNG."""
    try:
        head = path.read_bytes()[:24]
    except OSError:
        return None
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return [int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, help="PNG of the report's top at 1400 px (default: <report>.top.png)")
    args = parser.parse_args(argv)
    screenshot = args.screenshot or args.report.with_suffix(".top.png")
    result = check(args.report, screenshot)
    problems = []
    if not result.get("rendered"):
        problems.append("page did not render")
    if result.get("rendered") and result.get("screenshot_size") != list(WINDOW):
        problems.append(f"no {WINDOW[0]}x{WINDOW[1]} screenshot at {screenshot} (got {result.get('screenshot_size')})")
    problems += [f"image did not load: {b}" for b in result.get("broken", [])]
    problems += [f"broken link: {h}" for h in result.get("dangling", [])]
    print(json.dumps(result))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
