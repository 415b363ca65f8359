"""Open the HTML report in headless Chromium and check it as a reader would see it.

Checks that the page renders (a screenshot is written), that every <img> decodes (naturalWidth > 0)
and that every link resolves (in-page anchors exist; no link leaves the file). Exit code 0 when all
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


def check(report: Path, screenshot: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report_probe.html"
        probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        profile = ["--user-data-dir=" + str(Path(tmp) / "profile")]
        dom = subprocess.run(
            [chromium(), *FLAGS, *profile, "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        ).stdout
        if screenshot is not None:
            subprocess.run(
                [chromium(), *FLAGS, *profile, "--window-size=1280,2000", f"--screenshot={screenshot}", report.resolve().as_uri()],
                capture_output=True, text=True, timeout=120,
            )
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, flags=re.S)
    if not found:
        return {"rendered": False}
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    result["rendered"] = result["height"] > 0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args(argv)
    result = check(args.report, args.screenshot)
    problems = []
    if not result.get("rendered"):
        problems.append("page did not render")
    problems += [f"image did not load: {b}" for b in result.get("broken", [])]
    problems += [f"broken link: {h}" for h in result.get("dangling", [])]
    print(json.dumps(result))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
