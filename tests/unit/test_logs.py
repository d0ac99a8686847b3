"""JSON log lines stay whole when threads log at once."""

import io
import json
import sys
import threading
import time

from moemesh import logs


class SlowStream(io.StringIO):
    """A stream whose writes yield the GIL, as a pipe's may: interleaving shows up at once."""

    def write(self, text):
        time.sleep(0.0001)
        return super().write(text)


def test_concurrent_events_are_one_json_object_per_line(monkeypatch):
    buf = SlowStream()
    monkeypatch.setattr(sys, "stderr", buf)
    logs.configure("info")
    log = logs.get_logger("t")

    def spam(i):
        for j in range(100):
            log.info("event", thread=i, n=j)

    threads = [threading.Thread(target=spam, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 400
    assert all(json.loads(line)["event"] == "event" for line in lines)
