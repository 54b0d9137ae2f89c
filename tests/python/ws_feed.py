"""The live feed from Python's `websockets`: follow one task from submission to completion,
filter, replay after a reconnect, and be refused a bad parameter.

Run by coordinator/tests/feed.rs, which plays the agent (node `py-node`) against a
coordinator at the URL given as the first argument. Prints "ok: ..." when every check holds.
"""

import asyncio
import json
import sys
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
WS = "ws" + BASE[len("http"):] + "/ws/updates"
TIMEOUT = 30


def submit(code):
    request = urllib.request.Request(
        BASE + "/submit",
        data=json.dumps({"code": code}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.load(response)["task_id"]


async def until(ws, last):
    """Messages up to and including the first one `last` accepts (bounded wait)."""
    seen = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        seen.append(message)
        if last(message):
            return seen


async def main():
    async with connect(WS) as everything, connect(WS + "?events=task_completed") as completions:
        task_id = await asyncio.to_thread(submit, "print('hi')")
        seen = await until(
            everything,
            lambda m: m["event"] == "task_completed" and m["data"]["task_id"] == task_id,
        )
        for message in seen:
            assert set(message) == {"event", "data", "seq", "ts"}, message
        seqs = [m["seq"] for m in seen]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        mine = [m for m in seen if m["data"].get("task_id") == task_id]
        assert [m["event"] for m in mine] == ["task_created", "task_started", "task_completed"], mine
        assert mine[0]["data"]["status"] == "pending" and mine[0]["data"]["node_id"] is None, mine
        assert mine[1]["data"]["node_id"] == "py-node", mine
        assert mine[2]["data"]["status"] == "completed", mine

        only = json.loads(await asyncio.wait_for(completions.recv(), TIMEOUT))
        assert only == mine[2], (only, mine[2])

    # A reconnect asks for what came after the task's creation, for this task only.
    async with connect(f"{WS}?since={mine[0]['seq']}&task_id={task_id}") as again:
        replay = await until(again, lambda m: m["event"] == "task_completed")
        assert [m["event"] for m in replay] == ["task_started", "task_completed"], replay
        assert replay == mine[1:], (replay, mine)

    try:
        async with connect(WS + "?events=nope"):
            raise AssertionError("a bad filter was accepted")
    except InvalidStatus as refused:
        assert refused.response.status_code == 422, refused.response.status_code
        detail = json.loads(refused.response.body)["detail"]
        assert "unknown event" in detail, detail

    print(f"ok: task {task_id} seen created, started on py-node, completed; filter, replay and 422 hold")


if __name__ == "__main__":
    asyncio.run(main())
