"""The Trainer tab served as the WebUI serves it, around the fake host, for a real browser.

The tab's Blocks go into a page of their own, mounted on a FastAPI app that also has our /trainer/v1 routes;
javascript/trainer.js and style.css are put into the page's head the way the WebUI does it (it patches the
HTML gradio sends), together with the few page helpers the WebUI's own scripts define and ours use
(gradioApp, onUiLoaded, updateInput). The server runs in a thread on a free local port.
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# the WebUI's script.js / ui.js definitions our page script relies on, as the WebUI 1.10 defines them
WEBUI_SHIM = """
function gradioApp() {
    const elems = document.getElementsByTagName('gradio-app');
    const elem = elems.length == 0 ? document : elems[0];
    if (elem !== document) elem.getElementById = function(id) { return document.getElementById(id); };
    return elem.shadowRoot ? elem.shadowRoot : elem;
}
var uiLoadedCallbacks = [];
function onUiLoaded(callback) { uiLoadedCallbacks.push(callback); }
function updateInput(target) {
    let e = new Event("input", {bubbles: true});
    Object.defineProperty(e, "target", {value: target});
    target.dispatchEvent(e);
}
(function() {
    var timer = setInterval(function() {
        if (!gradioApp().getElementById("trainer_root")) return;
        clearInterval(timer);
        uiLoadedCallbacks.forEach(function(cb) { cb(); });
    }, 100);
})();
"""


def page_head() -> str:
    script = (ROOT / "javascript" / "trainer.js").read_text(encoding="utf-8")
    style = (ROOT / "style.css").read_text(encoding="utf-8")
    return f"<script>{WEBUI_SHIM}</script><script>{script}</script><style>{style}</style>"


def build_app(webui):
    """A FastAPI app with our routes and the tab at "/", for the installed fake host ``webui``."""
    import gradio as gr
    from fastapi import FastAPI
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import Response

    entry = importlib.import_module("lib_trainer.webui.entry")
    entry._manager = webui.manager
    ((tab, _, _),) = entry.on_ui_tabs()
    with gr.Blocks(analytics_enabled=False, title="Trainer") as page:
        tab.render()
    app = FastAPI()
    entry.on_app_started(None, app)
    head = page_head()

    class InjectHead(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            response = await call_next(request)
            if request.url.path != "/" or "text/html" not in response.headers.get("content-type", ""):
                return response
            body = b"".join([chunk async for chunk in response.body_iterator]).decode("utf-8")
            body = body.replace("</head>", head + "</head>", 1)
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            return Response(body, status_code=response.status_code, headers=headers, media_type="text/html")

    app.add_middleware(InjectHead)
    page.queue()
    return gr.mount_gradio_app(app, page, path="/")


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", ws="websockets")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
