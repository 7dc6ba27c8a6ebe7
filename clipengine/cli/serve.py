"""`clipengine serve`: the service's options, and what it says once it listens."""

from __future__ import annotations

from typing import Annotated

import typer

from clipengine.cli.common import (
    IndexDirArg,
    app,
    err,
    user_errors,
)
from clipengine.index.location import resolve_index_path


@app.command()
@user_errors
def serve(
    index_names: Annotated[list[str], typer.Option(
        "--index", "-i", help="Index to serve (name or path); repeat for several, picked on the page.")] = ["default"],  # noqa: B006
    index_dir: IndexDirArg = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    token: Annotated[str | None, typer.Option(
        envvar="CLIPENGINE_TOKEN", help="Require this bearer token on every request (open the page as /?token=...).")] = None,
    max_upload: Annotated[str, typer.Option(help="Largest image a search may upload.")] = "64MiB",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Keep every served index up to date with its folders as files change.")] = False,
) -> None:
    """Keep indexes open behind an HTTP API and a web page: search them in a browser, or from other programs.

    `clipengine search` on a served index asks the service, which answers in milliseconds."""
    from clipengine.serve.app import ServiceConfig
    from clipengine.serve.server import serve as run_service
    from clipengine.sizes import parse_size

    names = {}
    for name in index_names:
        path = resolve_index_path(name, index_dir)
        names[path.name if path.name not in names else str(path)] = path
    config = ServiceConfig(names, token=token, max_upload=parse_size(max_upload, "--max-upload"), watch=watch)

    def ready(url: str, warnings: list[str]) -> None:
        for warning in warnings:
            err.print(f"warning: {warning}", markup=False)
        err.print(f"serving {', '.join(names)} at {url}  (API docs: {url}/docs; Ctrl-C stops)"
                  + ("; watching their folders" if watch else ""), markup=False)
        if open_browser:
            import webbrowser

            webbrowser.open(url + (f"/?token={token}" if token else "/"))

    try:
        run_service(config, host, port, on_ready=ready)
    except KeyboardInterrupt:
        err.print("stopped", markup=False)
