"""Drives Lull's web console in headless Chromium (Debian's `chromium`) with Playwright.

Started by tests/tests/console.rs against a real coordinator and agent. Each scenario acts
as a person would (clicks, types, waits for what the page shows) and saves a screenshot of
every page at 1280x800 and at a narrow width into --shots. Any failed expectation raises,
so the script exits non-zero; it prints `console: N passed, 0 failed` when all held.

    python3 console_browser.py --url URL --shots DIR --scenario open --node NODE_ID
    python3 console_browser.py --url URL --shots DIR --scenario auth --node NODE_ID \
        --viewer TOKEN --submitter TOKEN --submitter-secret SECRET --admin TOKEN
"""

import argparse
import os
import sys

from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect, sync_playwright

WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 420, "height": 860}
WAIT_MS = 60_000
CHROMIUM = os.environ.get("LULL_CHROMIUM", "/usr/bin/chromium")

checks = []


def check(name):
    """Records a passed step (a failed one raises before it is recorded)."""
    checks.append(name)
    print(f"  ok: {name}", flush=True)


def shot(page, shots, name):
    path = os.path.join(shots, f"{name}.png")
    page.screenshot(path=path, full_page=True)
    print(f"  screenshot: {path}", flush=True)


def both_widths(page, shots, name):
    """A screenshot at 1280x800 and one at a narrow width, back to wide after."""
    page.set_viewport_size(WIDE)
    shot(page, shots, f"{name}-1280")
    page.set_viewport_size(NARROW)
    shot(page, shots, f"{name}-narrow")
    page.set_viewport_size(WIDE)


def watch_errors(page, errors):
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )


def submit_through_form(page, url, shots, tag):
    """Types a program (using Tab to indent) into the Submit form, submits it, and sees
    it reach `completed` with its output in the same page (no reload)."""
    page.goto(f"{url}/ui/submit")
    code = page.locator("textarea[name=code]")
    code.fill("")
    code.click()
    code.press_sequentially(f"for i in range(3):\n")
    code.press("Tab")
    code.press_sequentially(f'print("{tag}", i * 7)')
    value = code.input_value()
    assert '\n    print(' in value, f"Tab did not indent: {value!r}"
    check("the code editor indents with Tab")
    page.fill("input[name=timeout]", "30")
    page.fill("input[name='resources.cpu']", "0.5")
    page.fill("input[name='resources.memory']", "256")
    page.evaluate("window.__sameDocument = true")
    page.click("#submit-form button[type=submit]")
    status = page.locator("#follow-part #task-status")
    expect(status).to_have_text("completed", timeout=WAIT_MS)
    expect(page.locator("#follow-part #task-result")).to_contain_text(f"{tag} 14")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    check(f"a task submitted through the form reached completed with its output ({tag})")
    task_id = int(page.locator("#follow-part .task-head").get_attribute("data-task-id"))
    return task_id


def scenario_open(page, url, shots, node):
    page.goto(f"{url}/ui")
    expect(page.locator("#feed")).to_have_text("live", timeout=WAIT_MS)
    expect(page.locator("#who")).to_have_text("no auth")
    check("the overview follows the live feed")
    expect(page.locator(".counters .counter").first).to_be_visible()
    expect(page.locator("svg.chart")).to_have_count(2)
    expect(page.locator(".chip.status-idle b")).to_have_text("1", timeout=WAIT_MS)
    check("the overview shows counters, two charts and node counts")

    task_id = submit_through_form(page, url, shots, "console says")
    both_widths(page, shots, "submit")

    # The overview counted it without a reload.
    page.goto(f"{url}/ui")
    expect(page.locator(".counter.completed .value")).to_have_text("1", timeout=WAIT_MS)
    expect(page.locator("svg.chart rect.c-bar")).to_have_count(1)
    # The bar as drawn, once the page has laid it out (right after a load, or after the live
    # feed replaced the chart, it can be in the document with no size yet): both figures read
    # from one element in one go, polled until drawn or WAIT_MS.
    measure = "() => { const bar = document.querySelector('svg.chart rect.c-bar'); " \
        "return bar ? [parseFloat(bar.getAttribute('height')), bar.getBoundingClientRect().height] : [0, 0]; }"
    try:
        page.wait_for_function(f"() => {{ const [h, d] = ({measure})(); return h > 0 && d > 0.5 * h; }}",
                               timeout=WAIT_MS)
    except PlaywrightTimeout:
        pass
    height, drawn = page.evaluate(measure)
    assert height > 0 and drawn > 0.5 * height, f"the bar is drawn {drawn} px high for a height of {height}"
    check("the throughput chart has a bar for the completed task")
    both_widths(page, shots, "overview")

    # The task list, live: a task submitted elsewhere appears without a reload.
    page.goto(f"{url}/ui/tasks")
    row = page.locator(f"tr[data-task='{task_id}']")
    expect(row.locator(".badge")).to_have_text("completed")
    page.evaluate("window.__sameDocument = true")
    created = page.evaluate(
        """async () => (await (await fetch('/api/v1/tasks', {method: 'POST',
            headers: {'content-type': 'application/json'},
            body: JSON.stringify({code: 'print(6 * 7)'})})).json()).task_id"""
    )
    expect(page.locator(f"tr[data-task='{created}'] .badge")).to_have_text("completed", timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    check("the task list shows a task submitted elsewhere, live")
    page.select_option("#task-filter select", "failed")
    expect(page.locator(".pager")).to_contain_text("No failed tasks", timeout=WAIT_MS)
    page.select_option("#task-filter select", "completed")
    expect(page.locator(f"tr[data-task='{task_id}']")).to_be_visible(timeout=WAIT_MS)
    check("the task list filters by status")
    both_widths(page, shots, "tasks")

    # The task's detail: every run.
    page.goto(f"{url}/ui/tasks/{task_id}")
    run = page.locator(".run").first
    expect(run.locator("td").nth(3)).to_have_text(node)
    expect(run.locator("td").nth(8)).to_have_text("0")
    expect(run.locator("pre.out").first).to_contain_text("console says 7")
    expect(page.locator(".task-head button.danger")).to_be_disabled()
    check("the task detail shows its run: node, exit code, stdout; cancel is off once finished")
    both_widths(page, shots, "task")

    # Cancel from the detail page: a task that sleeps.
    long_id = page.evaluate(
        """async () => (await (await fetch('/api/v1/tasks', {method: 'POST',
            headers: {'content-type': 'application/json'},
            body: JSON.stringify({code: 'import time\\ntime.sleep(120)'})})).json()).task_id"""
    )
    page.goto(f"{url}/ui/tasks/{long_id}")
    expect(page.locator("#task-status")).to_have_text("running", timeout=WAIT_MS)
    page.click(".task-head button.danger")
    expect(page.locator("#task-status")).to_have_text("cancelled", timeout=WAIT_MS)
    check("the cancel button cancels a running task")

    # Nodes: drain with a timeout, see the status change, undrain.
    page.goto(f"{url}/ui/nodes")
    row = page.locator(f"tr[data-node='{node}']")
    expect(row.locator(".node-status")).to_have_text("idle", timeout=WAIT_MS)
    expect(row.locator(".bar").first).to_be_visible()
    row.locator("input[name=timeout]").fill("30")
    row.locator("button.drain").click()
    expect(row.locator(".node-status")).to_have_text("drained", timeout=WAIT_MS)
    expect(page.locator("#commands-part")).to_contain_text("drain", timeout=WAIT_MS)
    check("draining a node from the nodes page changes its status to drained")
    both_widths(page, shots, "nodes-drained")
    row.locator("button.undrain").click()
    expect(row.locator(".node-status")).to_have_text("idle", timeout=WAIT_MS)
    check("undrain brings it back to idle")
    row.locator("details summary").click()
    row.locator("textarea[name=meta]").fill('{"rack": 7}')
    row.locator("form.meta button").click()
    expect(page.locator("#flash")).to_have_text("meta saved", timeout=WAIT_MS)
    expect(row.locator("textarea[name=meta]")).to_have_value('{\n  "rack": 7\n}', timeout=WAIT_MS)
    check("meta edited as JSON is saved")
    row.locator("details summary").click()
    both_widths(page, shots, "nodes")
    row.locator("button.restart").click()
    expect(page.locator("#flash")).to_contain_text("restart sent", timeout=WAIT_MS)
    restart = page.locator("#commands-part tbody tr", has_text="restart")
    expect(restart.locator(".badge")).to_have_text("succeeded", timeout=WAIT_MS)
    expect(row.locator(".node-status")).to_have_text("idle", timeout=WAIT_MS)
    check("restart from the nodes page: the agent restarts and its command succeeds")

    # Operations: none yet on this coordinator (tests/tests/console.rs shrinks in its own).
    page.goto(f"{url}/ui/operations")
    expect(page.locator("#operations")).to_contain_text("No operation yet.", timeout=WAIT_MS)
    expect(page.locator("#shrink-form button[type=submit]")).to_be_enabled()
    check("the operations page lists operations (none yet)")
    both_widths(page, shots, "operations")
    operations_drawn_from_the_contract(page, url, shots)


def operations_drawn_from_the_contract(page, url, shots):
    """Operations in every state at once (seed 002's DagDetailDTO, stage messages with
    markup), from a canned answer on the browser's side: a failed one says why."""
    stage = lambda name, state, message="": {  # noqa: E731
        "name": name, "state": state, "message": message,
        "start_time": "2026-01-01T10:00:00Z" if state != "READY" else "0001-01-01T00:00:00Z",
        "end_time": "2026-01-01T10:00:05Z" if state in ("SUCCEEDED", "FAILED") else "0001-01-01T00:00:00Z",
    }
    canned = {"items": [
        {"id": "2", "dag_id": 2, "name": "Cluster shrink", "stage": 2, "max_stage": 3,
         "state": "RUNNING", "operator": "RUN", "start_time": "2026-01-01T10:00:00Z",
         "end_time": "0001-01-01T00:00:00Z", "additional_data": {"shrink_number": 1},
         "nodes": [stage("Drain nodes", "SUCCEEDED"), stage("Decommission <agents>", "RUNNING"),
                   stage("Mark removed", "READY")]},
        {"id": "1", "dag_id": 1, "name": "Cluster scale out", "stage": 1, "max_stage": 6,
         "state": "FAILED", "operator": "RUN", "start_time": "2026-01-01T09:00:00Z",
         "end_time": "2026-01-01T09:00:02Z", "additional_data": None,
         "nodes": [stage("Check agent", "FAILED", "connection refused at 10.0.0.9:7070")]},
    ]}
    import json
    page.route("**/api/v1/operations?*", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(canned)))
    page.goto(f"{url}/ui/operations")
    running = page.locator("article.op[data-op='2']")
    expect(running.locator(".op-state")).to_have_text("RUNNING", timeout=WAIT_MS)
    expect(running.locator("tr[data-stage='2'] .badge")).to_have_text("RUNNING")
    expect(running.locator("tr[data-stage='2']")).to_contain_text("Decommission <agents>")
    expect(running.locator(".progress")).to_contain_text("stage 2 / 3")
    failed = page.locator("article.op[data-op='1']")
    expect(failed.locator("tr[data-stage='1']")).to_contain_text("connection refused")
    expect(page.locator("#shrink-form button[type=submit]")).to_be_enabled()
    check("operations, their stages and states are drawn from seed 002's shape (canned answer)")
    both_widths(page, shots, "operations-canned")
    page.unroute("**/api/v1/operations?*")


def scenario_shrink(page, url, shots, node):
    """An online shrink of the only node started from the operations page, with a task
    running on it: the operation's stages progress to SUCCEEDED, the task finishes first."""
    page.goto(f"{url}/ui/operations")
    expect(page.locator("#operations")).not_to_contain_text("Loading", timeout=WAIT_MS)
    task_id = page.evaluate(
        """async () => (await (await fetch('/api/v1/tasks', {method: 'POST',
            headers: {'content-type': 'application/json'},
            body: JSON.stringify({code: 'import time\\ntime.sleep(6)\\nprint("survived the shrink")'})})).json()).task_id"""
    )
    page.wait_for_function(
        f"""async () => (await (await fetch('/api/v1/tasks/{task_id}')).json()).status === 'running'""",
        polling=200, timeout=WAIT_MS,
    )
    page.fill("#shrink-form input[name=shrink_number]", "1")
    expect(page.locator("#shrink-form input[name=online]")).to_be_checked()
    page.click("#shrink-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text("shrink started: operation", timeout=WAIT_MS)
    op_id = page.locator("#flash").text_content().rsplit(" ", 1)[-1]
    card = page.locator(f"article.op[data-op='{op_id}']")
    # While the task still runs the online shrink waits in a stage: seen live, no reload.
    page.evaluate("window.__sameDocument = true")
    expect(card.locator(".op-state")).to_have_text("RUNNING", timeout=WAIT_MS)
    expect(card.locator("tr[data-stage] .badge", has_text="RUNNING")).to_have_count(1, timeout=WAIT_MS)
    check("the shrink's operation shows up RUNNING with one stage running")
    both_widths(page, shots, "shrink-running")
    expect(card.locator(".op-state")).to_have_text("SUCCEEDED", timeout=WAIT_MS)
    stages = card.locator("tr[data-stage] .badge")
    assert stages.count() >= 2, "a shrink has stages"
    for i in range(stages.count()):
        expect(stages.nth(i)).to_have_text("SUCCEEDED")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    check("its stages progress to SUCCEEDED, live")
    both_widths(page, shots, "shrink-succeeded")
    page.goto(f"{url}/ui/tasks/{task_id}")
    expect(page.locator("#task-status")).to_have_text("completed", timeout=WAIT_MS)
    expect(page.locator("#task-result")).to_have_text("survived the shrink")
    check("the task running on the shrunk node finished first")
    page.goto(f"{url}/ui/nodes")
    expect(page.locator(f"tr[data-node='{node}'] .node-status")).to_have_text("removed", timeout=WAIT_MS)
    check("the node is removed")


def sign_in(page, url, token, secret=None):
    page.goto(f"{url}/ui")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=WAIT_MS)
    page.fill("#key-form input[name=token]", token)
    if secret:
        page.fill("#key-form input[name=secret]", secret)
    page.click("#key-form button[type=submit]")
    page.wait_for_load_state()
    expect(dialog).to_be_hidden(timeout=WAIT_MS)


def sign_out(page):
    page.click("#sign-out")
    expect(page.locator("#key-dialog")).to_be_visible(timeout=WAIT_MS)


def scenario_auth(page, url, shots, node, args):
    page.goto(f"{url}/ui")
    expect(page.locator("#key-dialog")).to_be_visible(timeout=WAIT_MS)
    check("with auth on the console asks for an API key")
    both_widths(page, shots, "auth-key-prompt")

    page.fill("#key-form input[name=token]", "lull_not_a_key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_contain_text("unknown API key", timeout=WAIT_MS)
    check("a wrong key is refused with the coordinator's reason")

    page.fill("#key-form input[name=token]", args.viewer)
    page.click("#key-form button[type=submit]")
    page.wait_for_load_state()
    expect(page.locator("#who")).to_have_text("key: viewer", timeout=WAIT_MS)
    expect(page.locator("#feed")).to_have_text("live", timeout=WAIT_MS)
    check("the live feed takes a simple key in its query string")
    stored = page.evaluate("sessionStorage.getItem('lull.key')")
    assert args.viewer in stored, "the key is not in sessionStorage"
    assert page.evaluate("localStorage.length") == 0, "something was kept in localStorage"
    expect(page.locator(".counters .counter").first).to_be_visible(timeout=WAIT_MS)
    page.goto(f"{url}/ui/submit")
    expect(page.locator("#who")).to_have_text("key: viewer", timeout=WAIT_MS)
    expect(page.locator("#submit-form button[type=submit]")).to_be_disabled()
    page.goto(f"{url}/ui/nodes")
    row = page.locator(f"tr[data-node='{node}']")
    expect(row.locator(".node-status")).to_have_text("idle", timeout=WAIT_MS)
    expect(row.locator("button.drain")).to_be_disabled()
    expect(row.locator("button.restart")).to_be_disabled()
    both_widths(page, shots, "auth-viewer-nodes")
    page.goto(f"{url}/ui/operations")
    expect(page.locator("#shrink-form button[type=submit]")).to_be_disabled(timeout=WAIT_MS)
    check("a viewer key sees the pages with every button disabled")
    both_widths(page, shots, "auth-viewer-operations")

    sign_out(page)
    sign_in(page, url, args.submitter, args.submitter_secret)
    expect(page.locator("#who")).to_have_text("key: submitter", timeout=WAIT_MS)
    expect(page.locator("#feed")).to_have_text("live", timeout=WAIT_MS)
    check("the live feed takes a signed key's signature in its query string")
    task_id = submit_through_form(page, url, shots, "signed by the browser")
    check(f"a signed submitter key submits through the form (task {task_id})")
    page.goto(f"{url}/ui/tasks")
    expect(page.locator(f"tr[data-task='{task_id}']")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(f"tr[data-task='{args.others_task}']")).to_have_count(0)
    page.goto(f"{url}/ui/tasks/{args.others_task}")
    expect(page.locator(".part")).to_contain_text(f"Task {args.others_task} not found", timeout=WAIT_MS)
    check("a submitter sees its own tasks only")
    both_widths(page, shots, "auth-submitter-tasks")
    page.goto(f"{url}/ui/nodes")
    row = page.locator(f"tr[data-node='{node}']")
    expect(row.locator(".node-status")).to_have_text("idle", timeout=WAIT_MS)
    expect(row.locator("button.drain")).to_be_disabled()
    check("a submitter may not manage nodes")

    sign_out(page)
    sign_in(page, url, args.admin)
    page.goto(f"{url}/ui/nodes")
    row = page.locator(f"tr[data-node='{node}']")
    expect(row.locator("button.drain")).to_be_enabled(timeout=WAIT_MS)
    row.locator("button.drain").click()
    expect(row.locator(".node-status")).to_have_text("drained", timeout=WAIT_MS)
    check("an admin key drains a node")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--shots", required=True)
    parser.add_argument("--scenario", choices=["open", "auth", "shrink"], required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--viewer")
    parser.add_argument("--submitter")
    parser.add_argument("--submitter-secret")
    parser.add_argument("--admin")
    parser.add_argument("--others-task", help="a task the submitter did not submit")
    args = parser.parse_args()
    os.makedirs(args.shots, exist_ok=True)
    errors = []
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
        except Exception as e:  # noqa: BLE001 — any failure to start is the same failure
            print(f"console: cannot start Chromium at {CHROMIUM}: {e}", file=sys.stderr)
            print("console: 0 passed, 1 failed")
            return 2
        page = browser.new_page(viewport=WIDE)
        page.set_default_timeout(WAIT_MS)
        watch_errors(page, errors)
        try:
            if args.scenario == "open":
                scenario_open(page, args.url, args.shots, args.node)
            elif args.scenario == "shrink":
                scenario_shrink(page, args.url, args.shots, args.node)
            else:
                scenario_auth(page, args.url, args.shots, args.node, args)
        except Exception:
            shot(page, args.shots, f"{args.scenario}-failure")
            print(f"console: {len(checks)} passed, 1 failed")
            raise
        finally:
            browser.close()
    # Refused requests (a wrong key, a 404 for operations) and a feed that could not connect
    # (the page falls back to polling) are logged by the browser itself; anything else is a bug.
    expected = ("401", "403", "404", "WebSocket connection")
    unexpected = [e for e in errors if not any(x in e for x in expected)]
    if unexpected:
        print("\n".join(unexpected), file=sys.stderr)
        print(f"console: {len(checks)} passed, 1 failed")
        return 1
    print(f"console: {len(checks)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
