"""``dladiff rate``: the local web page of the MOS study (paper §7.2, Fig. 5).

Python's ``http.server`` on 127.0.0.1 only, one self-contained page (no CDN, works offline). The
page shows one generated image at a time, in the rater's shuffled order, under a URL made of a
random item id only (no method, identity or file name), with the paper's five criteria; keys 1-5 or
the buttons rate it. Each rating is appended to ``ratings.csv`` before the next image is shown; a
restarted server, or a reloaded page, continues at the rater's first unrated image.

Requests are checked: the Host header must name this server (no DNS rebinding), a rating must be a
JSON POST carrying the page's session token (no cross-site form posts) and must rate the image
currently shown (no double ratings from a double key press); images are served by item id only.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dladiff.errors import InputError
from dladiff.evaluate.mos import CRITERIA, SCORES, Study, append_rating, check_rater, next_position, order_for, rated_items

log = logging.getLogger("dladiff")

HOST = "127.0.0.1"
MAX_BODY = 1024
ITEM_ID_CHARS = set("0123456789abcdef")


@dataclass
class RatingSession:
    """One rater's progress through a study; thread-safe."""

    study: Study
    rater: str
    order: list[str] = field(default_factory=list)
    rated: set[str] = field(default_factory=set)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, study: Study, rater: str) -> "RatingSession":
        """Resume ``rater``: their stored order, and the items already in ``ratings.csv``."""
        check_rater(rater)
        return cls(study, rater, order_for(study, rater), rated_items(study.root, rater))

    def state(self) -> dict:
        """What the page needs: position (1-based), total, the current item id (None when done)."""
        with self.lock:
            return self._state()

    def _state(self) -> dict:
        position = next_position(self.order, self.rated)
        done = position >= len(self.order)
        return {"rater": self.rater, "position": min(position + 1, len(self.order)), "total": len(self.order),
                "rated": len(self.rated & set(self.order)), "item": None if done else self.order[position], "done": done}

    def rate(self, item: str, score: int) -> dict:
        """Record ``score`` for the current item; raises ``ValueError`` if ``item`` is not the current one."""
        with self.lock:
            current = self._state()["item"]
            if item != current:
                raise ValueError("not the current image (rated already, or the page is out of date)")
            append_rating(self.study.root, self.rater, item, score)
            self.rated.add(item)
            return self._state()

    def image_file(self, item: str) -> Path | None:
        """The file of ``item``, looked up by id (never a path from the request)."""
        entry = self.study.items.get(item)
        return None if entry is None else self.study.root / entry["file"]


def criteria_html() -> str:
    rows = []
    for score in sorted(SCORES, reverse=True):
        rows.append(f'<li><button type="button" class="score" data-score="{score}">{score}</button>'
                    f'<span>{html.escape(CRITERIA[score])}</span></li>')
    return "\n".join(rows)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Image quality rating</title>
<style nonce="__NONCE__">
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #111; }
main { max-width: 1100px; margin: 0 auto; padding: 16px; display: flex; gap: 24px; flex-wrap: wrap; }
h1 { font-size: 1.3rem; margin: 0 0 4px; }
#view { flex: 1 1 520px; text-align: center; }
#frame { width: min(512px, 100%, 62vh); aspect-ratio: 1; margin: 8px auto; background: #ddd; display: flex;
         align-items: center; justify-content: center; }
#frame[hidden] { display: none; }
#shot { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#panel { flex: 1 1 340px; }
ol { list-style: none; padding: 0; margin: 8px 0; }
li { display: flex; gap: 10px; align-items: flex-start; margin: 8px 0; }
button.score { font-size: 1.2rem; width: 44px; height: 44px; flex: none; border: 1px solid #666; border-radius: 6px;
               background: #fff; cursor: pointer; }
button.score:hover, button.score:focus { background: #dde8ff; }
button.score:disabled { opacity: 0.4; cursor: default; }
#status { min-height: 1.4em; color: #444; }
#error { color: #b00020; min-height: 1.4em; }
.hint { color: #555; font-size: 0.9rem; }
</style></head>
<body><main>
<section id="view">
  <h1>Image quality rating</h1>
  <div id="status">Loading…</div>
  <div id="frame"><img id="shot" alt="generated image to rate"></div>
  <div id="error" role="alert"></div>
</section>
<section id="panel">
  <p>Rate the <b>visual quality</b> of the face on a five-point scale. Score 5 is the quality of images
  generated after fine-tuning on clean photos; 4 to 1 are increasing levels of distortion.</p>
  <ol id="criteria">
__CRITERIA__
  </ol>
  <p class="hint">Press a key from 1 to 5, or click a button. Each rating is saved at once; you can close the page
  and come back later (rater <b id="rater"></b>).</p>
</section>
</main>
<script nonce="__NONCE__">
"use strict";
const TOKEN = "__TOKEN__";
let current = null, ready = false, busy = false;
const shot = document.getElementById("shot"), statusLine = document.getElementById("status"),
      errorLine = document.getElementById("error"), buttons = Array.from(document.querySelectorAll("button.score"));
function enable(on) { buttons.forEach(b => { b.disabled = !on; }); }
function show(state) {
  document.getElementById("rater").textContent = state.rater;
  current = state.item; ready = false; enable(false);
  if (state.done) {
    statusLine.textContent = "All " + state.total + " images are rated. Thank you! You can close this page.";
    shot.removeAttribute("src"); document.getElementById("frame").hidden = true; document.body.dataset.done = "1"; return;
  }
  statusLine.textContent = "Image " + state.position + " of " + state.total;
  document.body.dataset.item = state.item;
  document.getElementById("frame").hidden = false; shot.src = "/image/" + state.item;
}
shot.addEventListener("load", () => { ready = true; enable(true); document.body.dataset.ready = current; });
shot.addEventListener("error", () => { if (current) errorLine.textContent = "The image could not be loaded."; });
async function refresh() {
  const r = await fetch("/api/state", {cache: "no-store"});
  show(await r.json());
}
async function rate(score) {
  if (!ready || busy || current === null) return;
  busy = true; enable(false);
  try {
    const r = await fetch("/api/rate", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({token: TOKEN, item: current, score: score})});
    const answer = await r.json();
    errorLine.textContent = r.ok ? "" : (answer.error || "The rating was not saved.");
    if (answer.state) show(answer.state); else enable(true);
  } catch (e) {
    errorLine.textContent = "The rating was not saved (is `dladiff rate` still running?).";
    enable(true);
  } finally { busy = false; }
}
document.addEventListener("keydown", e => {
  if (e.altKey || e.ctrlKey || e.metaKey) return;
  const score = Number(e.key);
  if (Number.isInteger(score) && score >= 1 && score <= 5) { e.preventDefault(); rate(score); }
});
buttons.forEach(b => b.addEventListener("click", () => rate(Number(b.dataset.score))));
refresh().catch(() => { errorLine.textContent = "Cannot reach the rating server."; });
</script></body></html>
"""


def page_html(session: RatingSession, nonce: str) -> str:
    return PAGE.replace("__CRITERIA__", criteria_html()).replace("__TOKEN__", session.token).replace("__NONCE__", nonce)


class RatingHandler(BaseHTTPRequestHandler):
    """Routes: ``/`` the page, ``/api/state``, ``POST /api/rate``, ``/image/<item id>``."""

    session: RatingSession
    server_version = "dladiff-rate"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("rate: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host", "") in (f"{HOST}:{port}", f"localhost:{port}")

    def do_GET(self):  # noqa: N802 - http.server's naming
        if not self._host_ok():
            return self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "wrong Host header"})
        path = self.path.split("?", 1)[0]
        if path == "/":
            nonce = secrets.token_urlsafe(12)
            csp = f"default-src 'none'; img-src 'self'; connect-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'"
            return self._send(HTTPStatus.OK, page_html(self.session, nonce).encode(), "text/html; charset=utf-8",
                              {"Content-Security-Policy": csp})
        if path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if path == "/api/state":
            return self._json(HTTPStatus.OK, self.session.state())
        if path.startswith("/image/"):
            return self._image(path[len("/image/"):])
        return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    do_HEAD = do_GET

    def _image(self, item: str) -> None:
        file = self.session.image_file(item) if set(item) <= ITEM_ID_CHARS else None
        if file is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": "no such image"})
        try:
            body = file.read_bytes()
        except OSError:
            return self._json(HTTPStatus.NOT_FOUND, {"error": "the image file is missing"})
        self._send(HTTPStatus.OK, body, "image/png")

    def do_POST(self):  # noqa: N802
        if not self._host_ok():
            return self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "wrong Host header"})
        if self.path != "/api/rate":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length needed"})
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
        try:
            data = json.loads(self.rfile.read(length))
        except ValueError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "not JSON"})
        self._rate(data)

    def _rate(self, data) -> None:
        if not isinstance(data, dict) or not secrets.compare_digest(str(data.get("token", "")), self.session.token):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "this page is out of date: reload it"})
        item, score = data.get("item"), data.get("score")
        if isinstance(score, bool) or not isinstance(score, int) or score not in SCORES or not isinstance(item, str):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "give an item id and a score from 1 to 5",
                                                       "state": self.session.state()})
        try:
            state = self.session.rate(item, score)
        except ValueError as exc:
            return self._json(HTTPStatus.CONFLICT, {"error": str(exc), "state": self.session.state()})
        except (InputError, OSError) as exc:
            log.error("rating not saved: %s", exc)
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the rating was not saved: {exc}",
                                                                 "state": self.session.state()})
        self._json(HTTPStatus.OK, {"state": state})


def make_server(session: RatingSession, port: int = 0) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:``port`` (0: a free port) serving ``session``; call ``serve_forever``."""
    handler = type("BoundRatingHandler", (RatingHandler,), {"session": session})
    try:
        server = ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        raise InputError(f"cannot listen on {HOST}:{port} ({exc.strerror}); choose another --port") from None
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/"
