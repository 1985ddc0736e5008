"""The ``tbfeat`` dashboard: a TensorBoard dynamic plugin (entry point
``tensorboard_plugins``), so that plain ``tensorboard --logdir runs`` lists it.

TensorBoard loads :data:`ENTRY` in an iframe and calls its ``render()``; the front end
(plain HTML, CSS and ES modules in ``static/``, no build step, nothing from a CDN) asks
the routes below, under ``/data/plugin/tbfeat/``, for what it shows:

============  ==========================  ===============================================
route         parameters                  answer
============  ==========================  ===============================================
``runs``                                  the runs tbfeat wrote (JSON)
``run``       ``run``                     stages, images, steps, layouts, metrics (JSON)
``image``     ``run``, ``tag``, ``step``  a logged picture, its bytes as logged
``tile``      ... ``channel``             one channel's tile of a ``features/`` grid (PNG)
``drift``     ``run``                     every stage's drift by step (JSON)
``figure``    ``run``, ``kind``,          the figure ``tbfeat export`` draws of that
              ``stage``, ``image``,       view (PNG, as a download)
              ``steps``
============  ==========================  ===============================================

Every parameter is checked against what the logdir holds (:mod:`tbfeat.dashboard.data`);
anything else is answered 400 with ``{"error": message}``. No request names a file: only
event files under the logdir are read, and the static files are a fixed list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from ..tags import PLUGIN_NAME
from .data import BadRequest, Board, content_type, parse_int, parse_steps

ENTRY = "/index.js"
"""The ES module TensorBoard loads (its ``render()`` draws the dashboard)."""
STATIC = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
"""The front end's files, by suffix: served from package data, never from a path."""


def _static() -> dict[str, tuple[bytes, str]]:
    """``name -> (bytes, MIME type)`` of the front end's files."""
    folder = resources.files(__package__) / "static"
    return {
        entry.name: (entry.read_bytes(), STATIC[suffix])
        for entry in folder.iterdir()
        if (suffix := "." + entry.name.rpartition(".")[2]) in STATIC
    }


class DashboardPlugin(base_plugin.TBPlugin):
    """Compare epochs side by side: the TensorBoard plugin of tbfeat's runs."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = getattr(context, "logdir", None) or None
        self._board = Board(self._logdir) if self._logdir else None
        self._files = _static()

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path=ENTRY, tab_name="tbfeat")

    def is_active(self) -> bool:
        """Whether the logdir holds a run with tbfeat pictures (also runs written before
        the run metadata that TensorBoard's listing looks for)."""
        if self._board is None:
            return False
        self._board.refresh()
        return bool(self._board.runs())

    def get_plugin_apps(self) -> dict[str, Callable]:
        apps: dict[str, Callable] = {
            "/runs": self._runs, "/run": self._run, "/image": self._image,
            "/tile": self._tile, "/drift": self._drift, "/figure": self._figure,
        }  # fmt: skip
        apps[ENTRY] = self._serve_file("index.js")
        for name in self._files:
            apps[f"/static/{name}"] = self._serve_file(name)
        return apps

    # ------------------------------------------------------------------ routes
    def _serve_file(self, name: str) -> Callable:
        data, mime = self._files[name]

        @wrappers.Request.application
        def serve(request: wrappers.Request) -> wrappers.Response:
            return http_util.Respond(request, data, mime)

        return serve

    def _answer(self, request: wrappers.Request, answer: Callable[[Board, Any], Any]) -> Any:
        """``answer(board, args)``'s result as a response; a bad request as 400."""
        try:
            if self._board is None:
                raise BadRequest("the tbfeat dashboard reads one logdir: start TensorBoard "
                                 "with --logdir (not --logdir_spec)")  # fmt: skip
            result = answer(self._board, request.args)
        except BadRequest as e:
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=400)
        if isinstance(result, bytes):
            return http_util.Respond(request, result, content_type(result))
        if isinstance(result, tuple):  # (file name, PNG): a download
            name, data = result
            disposition = [("Content-Disposition", f"attachment; filename={json.dumps(name)}")]
            return http_util.Respond(request, data, "image/png", headers=disposition)
        return http_util.Respond(request, result, "application/json")

    @wrappers.Request.application
    def _runs(self, request: wrappers.Request) -> wrappers.Response:
        def answer(board: Board, args: Any) -> Any:
            board.refresh()
            return board.runs()

        return self._answer(request, answer)

    @wrappers.Request.application
    def _run(self, request: wrappers.Request) -> wrappers.Response:
        def answer(board: Board, args: Any) -> Any:
            board.refresh()
            return board.run(_text(args, "run"))

        return self._answer(request, answer)

    @wrappers.Request.application
    def _image(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(request, lambda board, args: board.image(
            _text(args, "run"), _text(args, "tag"), parse_int("step", args.get("step"))))

    @wrappers.Request.application
    def _tile(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(request, lambda board, args: board.tile(
            _text(args, "run"), _text(args, "tag"), parse_int("step", args.get("step")),
            parse_int("channel", args.get("channel"), 0, 1 << 20)))

    @wrappers.Request.application
    def _drift(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(request, lambda board, args: board.drift(_text(args, "run")))

    @wrappers.Request.application
    def _figure(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(request, lambda board, args: board.figure(
            _text(args, "run"), _text(args, "kind"), _text(args, "stage"),
            _text(args, "image"), parse_steps(args.get("steps"))))


def _text(args: Any, name: str) -> str:
    """A required text parameter."""
    value = args.get(name)
    if not value:
        raise BadRequest(f"parameter {name!r} is required")
    if len(value) > 1024:
        raise BadRequest(f"parameter {name!r} is longer than 1024 characters")
    return value
