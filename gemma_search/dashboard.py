"""Serve optuna-dashboard on a study's storage: `gemma-search dashboard STUDY`.

    gemma-search dashboard sst2-gemma2-9b                  # http://127.0.0.1:8080/dashboard/...
    ssh -L 8080:127.0.0.1:8080 head-node                   # then open it on your laptop

The storage is opened here and handed to optuna-dashboard as an object, so the URL (and its
password) never reaches a command line, a log line or the page.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from gemma_search.errors import GemmaSearchError

__all__ = ["bind", "dashboard_link", "public_host_warning", "serve"]


def public_host_warning(host: str, port: int = 8080) -> str | None:
    """A warning for a host that is not loopback: anyone who reaches the port sees the study."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to any interface, so warn
    return (f"warning: serving on {host}, which other machines may reach; optuna-dashboard has "
            "no authentication and lets anyone who reaches it read, rename and delete studies. "
            f"Prefer the default 127.0.0.1 and a tunnel: ssh -L {port}:127.0.0.1:{port} "
            "THIS-MACHINE, or `kubectl port-forward`")


def dashboard_link(host: str, port: int, study_id: int | None) -> str:
    """The address to open: the study's page when its id is known, else the study list."""
    shown = host
    if host in ("0.0.0.0", "::", ""):
        # Bound to every interface: a browser cannot open 0.0.0.0 (Chrome blocks it), the
        # machine's name is what a colleague would type.
        shown = socket.gethostname()
    if ":" in shown:
        shown = f"[{shown}]"  # an IPv6 literal
    path = f"/dashboard/studies/{study_id}" if study_id is not None else "/dashboard/"
    return f"http://{shown}:{port}{path}"


def bind(app: Any, host: str, port: int) -> Any:
    """A threaded wsgiref server for `app`, bound to (host, port) but not yet serving.

    Binding before anything is printed turns a taken port into one line naming `--port`.
    """
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass  # one access-log line per plot request would bury the link in the terminal

    class ThreadedServer(ThreadingMixIn, WSGIServer):
        # The page fetches several API routes at once; a daemon thread per request lets
        # Ctrl-C exit without waiting for a browser's open connection.
        daemon_threads = True

    server_class: type[WSGIServer] = ThreadedServer
    if ":" in host:
        class ThreadedServer6(ThreadedServer):
            address_family = socket.AF_INET6

        server_class = ThreadedServer6
    try:
        return make_server(host, port, app, server_class=server_class,
                           handler_class=QuietHandler)
    except socket.gaierror as exc:
        raise GemmaSearchError(f"--host {host} cannot be resolved ({exc.strerror}); pass an "
                               "address of this machine, e.g. 127.0.0.1") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise GemmaSearchError(f"port {port} on {host} is already in use; pick another "
                                   "with --port (e.g. --port 8081)") from None
        if exc.errno == errno.EACCES:
            raise GemmaSearchError(f"no permission to listen on port {port}; ports below "
                                   "1024 need root, pick another with --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise GemmaSearchError(f"--host {host} is not an address of this machine; use "
                                   "127.0.0.1 or one of its interfaces") from None
        raise


def serve(name: str, url: str, host: str = "127.0.0.1", port: int = 8080, *,
          ready: Callable[[str], None] | None = None,
          warn: Callable[[str], None] | None = None) -> None:
    """Serve optuna-dashboard for study `name` until Ctrl-C.

    1. the study must exist (one-line errors from `load_study`);
    2. the port is bound; `warn` gets the no-authentication warning for a non-loopback
       host, then `ready(link)` the address to open;
    3. requests are served until interrupted; Ctrl-C returns normally.

    `port` 0 picks a free port; the link and the warning name the one chosen.
    """
    from gemma_search.storage import open_storage
    from gemma_search.study import load_study

    load_study(name, url)  # StudyNotFoundError, unreachable storage: one line each
    storage = open_storage(url, must_exist=True)
    study_id = int(storage.get_study_id_from_name(name))  # the study exists: checked above

    import optuna_dashboard

    server = bind(optuna_dashboard.wsgi(storage), host, port)
    bound = int(server.server_address[1])
    try:
        warning = public_host_warning(host, bound)
        if warning and warn is not None:
            warn(warning)
        if ready is not None:
            ready(dashboard_link(host, bound, study_id))
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a person stops a dashboard: not an error
    finally:
        server.server_close()
        storage.engine.dispose()
