"""The shipped workflows in a running ComfyUI (started outside this repository with this pack in custom_nodes):

    python tools/comfyui_workflows.py [--url http://127.0.0.1:8188] [--frontend --chromium /usr/bin/chromium]
                                      [--screenshots DIR] [--queue refalign_toy_demo ...]

1. every workflow is checked against the server's own node list (`/object_info`): known node types, links, widget
   values (`workflow_tools.validate`);
2. with `--frontend` (needs `playwright` and a Chromium): each workflow is loaded in the real frontend the server
   serves, and the toasts / dialogs it raises and any node type the frontend does not know are reported (a screenshot
   each with `--screenshots`);
3. the workflows named by `--queue` (default: the three toy ones, which need no downloads) are queued through
   `/prompt` and waited for: status, seconds, and the outputs (the Identity Check's report included).

The last line is `failures: N`; the exit status is 1 when N > 0."""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_tools import object_info_signatures, to_api_prompt, validate  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
TOY = ["refalign_toy_demo", "refalign_ab_identity_comparison", "refalign_toy_three_segments"]


def get(url: str):
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def queue(url: str, prompt: dict, timeout: float) -> tuple[str, float, dict]:
    """(status, seconds, history entry) of one prompt run to the end."""
    request = urllib.request.Request(f"{url}/prompt", json.dumps({"prompt": prompt}).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            prompt_id = json.load(response)["prompt_id"]
    except urllib.error.HTTPError as error:
        return f"refused: {error.read().decode()[:2000]}", 0.0, {}
    while time.perf_counter() - start < timeout:
        entry = get(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
            return entry["status"]["status_str"], time.perf_counter() - start, entry
        time.sleep(1)
    return "timed out", time.perf_counter() - start, {}


def frontend_check(url: str, names: list[str], chromium: str, screenshots: Path | None) -> int:
    """Load each workflow in the served frontend; print what it raised. Returns the number of failures (anything
    but ComfyUI's Missing Models dialog)."""
    from playwright.sync_api import sync_playwright

    failures = 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        page.goto(url, wait_until="networkidle", timeout=120_000)
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        for name in names:
            page.evaluate("async (graph) => { await window.app.loadGraphData(graph); }",
                          json.loads((WORKFLOWS / f"{name}.json").read_text()))
            time.sleep(4)
            raised = page.evaluate("Array.from(document.querySelectorAll('.p-toast-message, .p-dialog'))"
                                   ".map(e => e.innerText.slice(0, 300).replace(/\\s+/g, ' '))")
            unknown = page.evaluate("window.app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                                    ".map(n => n.type)")
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshots / f"{name}.png"))
            bad = [text for text in raised if not text.startswith("Missing Models")] + unknown
            failures += bool(bad)
            print(f"frontend {name}: {'ok' if not bad else 'FAILED'}; raised {raised or 'nothing'}; "
                  f"unknown node types {unknown or 'none'}", flush=True)
            page.keyboard.press("Escape")
            time.sleep(1)
        browser.close()
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--frontend", action="store_true", help="also load each workflow in the served frontend")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium for --frontend")
    parser.add_argument("--screenshots", type=Path, help="a folder for one screenshot per workflow (--frontend)")
    parser.add_argument("--queue", nargs="*", default=TOY, help="workflows to run through /prompt")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per queued workflow")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    signatures = object_info_signatures(get(f"{url}/object_info"))
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    failures = 0
    for name in names:
        errors = validate(json.loads((WORKFLOWS / f"{name}.json").read_text()), signatures)
        failures += bool(errors)
        print(f"server {name}: {'ok' if not errors else errors}", flush=True)
    if args.frontend:
        failures += frontend_check(url, names, args.chromium, args.screenshots)
    for name in args.queue:
        prompt = to_api_prompt(json.loads((WORKFLOWS / f"{name}.json").read_text()), signatures)
        status, seconds, entry = queue(url, prompt, args.timeout)
        failures += status != "success"
        print(f"prompt {name}: {status} in {seconds:.1f} s", flush=True)
        for message in entry.get("status", {}).get("messages", []):
            if message[0] == "execution_error":
                print(f"  error: {json.dumps(message[1])[:2000]}")
        for node_id, outputs in entry.get("outputs", {}).items():
            for kind, items in outputs.items():
                shown = [i.get("filename", i) if isinstance(i, dict) else i for i in items]
                print(f"  node {node_id} {kind}: {shown}")
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
