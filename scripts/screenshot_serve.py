"""The README's picture of `clipengine serve`: the demo's index (run `make demo` first), searched in
Debian's Chromium.

    .venv/bin/python scripts/screenshot_serve.py [--index demo-scenes] [--query "two red circles"] [--out docs/serve.png]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from clipengine.index.location import resolve_index_path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serving import start_service  # noqa: E402
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (one set of browser flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="demo-scenes")
    parser.add_argument("--query", default="two small red circles")
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    args = parser.parse_args()
    index = resolve_index_path(args.index)
    service, url = start_service(index, stderr=None)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(f"{url}/?q={args.query.replace(' ', '+')}")
            page.wait_for_selector(".hit >> nth=11")
            page.wait_for_function("[...document.querySelectorAll('.hit img')].slice(0, 12).every(i => i.complete)")
            page.screenshot(path=args.out)
            browser.close()
        from PIL import Image

        Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)  # a quarter of the bytes
        print(f"wrote {args.out}")
    finally:
        service.send_signal(signal.SIGINT)
        service.wait(timeout=30)


if __name__ == "__main__":
    main()
