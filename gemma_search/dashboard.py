"""Serve optuna-dashboard on a study's storage: `gemma-search dashboard STUDY`.

    gemma-search dashboard sst2-gemma2-9b                  # http://127.0.0.1:8080/dashboard/...
    ssh -L 8080:127.0.0.1:8080 head-node                   # then open it on your laptop
    gemma-search dashboard sst2-gemma2-9b --host 0.0.0.0   # read-only, behind a token

The storage is opened here and handed to optuna-dashboard as an object, so the URL (and its
password) never reaches a command line, a log line or the page.

optuna-dashboard has no login, and its API renames, deletes and rewrites studies. Anywhere
but loopback, `Guard` sits in front of it: every request needs the dashboard's token, only
GET and HEAD pass, and the storage it is given refuses writes as well (`ReadOnlyStorage`).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import html
import ipaddress
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from optuna.storages import BaseStorage

from gemma_search.errors import GemmaSearchError

__all__ = ["Access", "Compress", "Guard", "ReadOnlyStorage", "access_for", "bind", "dashboard_link",
           "is_loopback", "read_token", "serve"]

#: Methods that only read; anything else is a write to optuna-dashboard's API.
READ_METHODS = frozenset({"GET", "HEAD"})


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only. A host name may resolve to any
    interface, so only `localhost` and loopback addresses count."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Access:
    """Who may do what: the token asked for (None: none) and whether writes are refused."""

    def __init__(self, token: str | None, read_only: bool, *, token_file: Path | None = None):
        self.token = token
        self.read_only = read_only
        self.token_file = token_file
        """Where the token came from; None when it was generated for this run."""


def read_token(path: Path) -> str:
    """The token in `path`: its first line, without surrounding whitespace."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GemmaSearchError(f"--token-file {path} does not exist; write a token into it, "
                               "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                               f" > {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GemmaSearchError(f"--token-file {path} cannot be read ({exc}); pass a text "
                               "file that holds the token on its first line") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise GemmaSearchError(f"--token-file {path} holds {len(token)} characters on its "
                               "first line; a token needs at least 16, e.g. python -c 'import "
                               "secrets; print(secrets.token_urlsafe(32))'")
    return token


def access_for(host: str, *, read_only: bool = False, token_file: Path | None = None
               ) -> Access:
    """The access rules for a dashboard bound to `host`.

    Loopback keeps optuna-dashboard as it is (the UI can rename and delete studies) unless
    `read_only` or `token_file` say otherwise: only this machine reaches it. Any other
    host is read-only and asks for a token, the one in `token_file` or a fresh one.
    """
    token = read_token(token_file) if token_file is not None else None
    if is_loopback(host):
        return Access(token, read_only, token_file=token_file)
    return Access(token or secrets.token_urlsafe(32), True, token_file=token_file)


def sharing_note(host: str, access: Access) -> str | None:
    """What a person should know before sharing the address, or None on plain loopback."""
    if is_loopback(host) and access.token is None:
        return None
    what = ("read-only: nobody can change or delete the study through it" if access.read_only
            else "studies can be renamed and deleted through it")
    where = ("the link below holds the token: it is a secret, share it only with people "
             "who may see the study" if access.token_file is None else
             f"it asks for the token in {access.token_file}: open the link with "
             "?token=TOKEN added once, or send Authorization: Bearer TOKEN")
    return f"note: serving on {host}, {what}; {where}"


def dashboard_link(host: str, port: int, study_id: int | None,
                   token: str | None = None) -> str:
    """The address to open: the study's page when its id is known, else the study list;
    with `token`, the link that hands the browser its token once."""
    shown = host
    if host in ("0.0.0.0", "::", ""):
        # Bound to every interface: a browser cannot open 0.0.0.0 (Chrome blocks it), the
        # machine's name is what a colleague would type.
        shown = socket.gethostname()
    if ":" in shown:
        shown = f"[{shown}]"  # an IPv6 literal
    path = f"/dashboard/studies/{study_id}" if study_id is not None else "/dashboard/"
    query = "" if token is None else "?" + urlencode({"token": token})
    return f"http://{shown}:{port}{path}{query}"


StartResponse = Callable[..., Any]


def _host_name(netloc: str) -> str:
    """`127.0.0.1` from `127.0.0.1:8080`, `::1` from `[::1]:8080`."""
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class Guard:
    """WSGI middleware in front of optuna-dashboard: the token, then the method.

    1. With a token, a request must carry it: `Authorization: Bearer TOKEN`, the cookie a
       browser got from a `?token=TOKEN` link, or that link itself. The link answers with
       the cookie (HttpOnly, SameSite=Strict) and a page that reloads the address without
       the token, so the token leaves the address bar and browser history. Anything else
       is 401.
    2. Read-only: only GET and HEAD reach optuna-dashboard; other methods are 405.
    3. Without a token (loopback), a request must name a loopback host: a web page that
       points its own host name at 127.0.0.1 (DNS rebinding) reaches the port, but its
       requests name the page's host. Writes must not come from another site's page (its
       Origin differs from the Host it asks): that page could otherwise post to the API.
    """

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
                 access: Access) -> None:
        self._app = app
        self._access = access
        token = access.token
        self._token = None if token is None else token.encode()
        # One cookie name per token: two dashboards on one host keep their own cookies.
        digest = hashlib.sha256(self._token or b"").hexdigest()[:12]
        self._cookie = f"gemma_search_dashboard_{digest}"

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if self._token is not None:
            query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            given = [value for key, value in query if key == "token"]
            if given:
                if method in READ_METHODS and len(given) == 1 and self._matches(given[0]):
                    rest = [(key, value) for key, value in query if key != "token"]
                    return self._hand_over(environ, start_response, rest)
                return _refuse(start_response, "401 Unauthorized", self._ask())
            if not self._authorized(environ):
                return _refuse(start_response, "401 Unauthorized", self._ask())
        elif not is_loopback(_host_name(environ.get("HTTP_HOST", ""))):
            return _refuse(start_response, "403 Forbidden", "this dashboard answers only to "
                           "127.0.0.1, localhost and ::1 (it listens on loopback)")
        if method not in READ_METHODS:
            if self._access.read_only:
                return _refuse(start_response, "405 Method Not Allowed",
                               "this dashboard is read-only: studies cannot be changed or "
                               "deleted through it", [("Allow", "GET, HEAD")])
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and origin.split("://", 1)[-1] != environ.get("HTTP_HOST"):
                return _refuse(start_response, "403 Forbidden",
                               f"a change sent from another site ({origin}) is refused")
        return self._app(environ, start_response)

    def _matches(self, given: str) -> bool:
        assert self._token is not None
        # Constant time: how long a wrong guess takes says nothing about the token.
        return hmac.compare_digest(given.encode(), self._token)

    def _authorized(self, environ: dict[str, Any]) -> bool:
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer" and self._matches(credentials.strip()):
            return True
        from http.cookies import CookieError, SimpleCookie

        try:
            cookies = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        except CookieError:
            return False
        morsel = cookies.get(self._cookie)
        return morsel is not None and self._matches(morsel.value)

    def _ask(self) -> str:
        return ("this dashboard asks for its token: open the link `gemma-search dashboard` "
                "printed (it ends in ?token=...), or send Authorization: Bearer TOKEN")

    def _hand_over(self, environ: dict[str, Any], start_response: StartResponse,
                   rest: Sequence[tuple[str, str]]) -> Iterable[bytes]:
        """The cookie, and a page that goes on to the same address without the token.

        A page, not a 303: a link clicked on another site (chat, mail) starts a cross-site
        navigation, and browsers do not send a SameSite=Strict cookie along a redirect of
        it; the page's own reload is same-site.
        """
        from urllib.parse import quote

        assert self._token is not None
        path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/"
        target = path + ("?" + urlencode(rest) if rest else "")
        body = (f'<!doctype html><meta http-equiv="refresh" content="0; url='
                f'{html.escape(target)}"><title>gemma-search dashboard</title>'
                f'<a href="{html.escape(target)}">continue</a>\n').encode()
        start_response("200 OK", [
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Set-Cookie", f"{self._cookie}={self._token.decode()}; Path=/; HttpOnly; "
                           "SameSite=Strict"),
            ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer"),
            ("Content-Security-Policy", "default-src 'none'")])
        return [body]


class Compress:
    """WSGI middleware: gzip an answer for a client that accepts it (every browser does).

    optuna-dashboard sends a study page's trials as one JSON answer of about 4 KB a trial,
    most of it each parameter's distribution, repeated in every trial: 42 MB for 10,000
    trials. That repetition is what gzip removes best (docs/benchmarks.md, "Study scale").
    Answers below `MIN_BYTES`, already encoded, or not 200 pass as they are.
    """

    MIN_BYTES = 1024
    LEVEL = 5  # 42 MB of trials in well under a second; higher levels gain little here

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
                 ) -> None:
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        if not accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", "")):
            return self._app(environ, start_response)
        answer: dict[str, Any] = {}
        written: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                    ) -> Callable[[bytes], Any]:
            answer.update(status=status, headers=headers)
            return written.append

        result = self._app(environ, capture)
        try:
            written.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        body = b"".join(written)
        status, headers = answer["status"], answer["headers"]
        names = {name.lower() for name, _ in headers}
        if (len(body) < self.MIN_BYTES or "content-encoding" in names
                or not status.startswith("200") or environ.get("REQUEST_METHOD") == "HEAD"):
            start_response(status, headers)
            return [body]
        import gzip

        packed = gzip.compress(body, self.LEVEL, mtime=0)
        start_response(status, [(k, v) for k, v in headers if k.lower() != "content-length"]
                       + [("Content-Encoding", "gzip"), ("Content-Length", str(len(packed))),
                          ("Vary", "Accept-Encoding")])
        return [packed]


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (`gzip;q=0` refuses it)."""
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and _quality(q[2:]) == 0)
    return False


def _quality(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


def _refuse(start_response: StartResponse, status: str, why: str,
            headers: Sequence[tuple[str, str]] = ()) -> list[bytes]:
    body = f"{status}: {why}\n".encode()
    extra = [("WWW-Authenticate", 'Bearer realm="gemma-search dashboard"')] \
        if status.startswith("401") else []
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                            *extra, *headers])
    return [body]


class ReadOnlyStorage(BaseStorage):
    """An Optuna storage that reads through to `storage` and refuses every write.

    Behind `Guard` no write request reaches optuna-dashboard; this is the second wall, for
    a route that writes on a GET, in this version of optuna-dashboard or a later one.
    """

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise GemmaSearchError("the dashboard is read-only: it does not write to the storage")

    create_new_study = delete_study = set_study_user_attr = set_study_system_attr = _refuse
    create_new_trial = set_trial_param = set_trial_state_values = _refuse
    set_trial_intermediate_value = set_trial_user_attr = set_trial_system_attr = _refuse

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._storage.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._storage.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> Any:
        return self._storage.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._storage.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._storage.get_study_system_attrs(study_id)

    def get_all_studies(self) -> Any:
        # optuna-dashboard sorts only an RDBStorage's studies by id; this one is not one.
        return sorted(self._storage.get_all_studies(), key=lambda s: s._study_id)

    def get_trial(self, trial_id: int) -> Any:
        return self._storage.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Any = None) -> Any:
        return self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: Any = None) -> int:
        return self._storage.get_n_trials(study_id, state)

    def get_best_trial(self, study_id: int) -> Any:
        return self._storage.get_best_trial(study_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._storage.get_trial_number_from_id(trial_id)

    def remove_session(self) -> None:
        self._storage.remove_session()


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
          access: Access | None = None,
          ready: Callable[[str], None] | None = None,
          warn: Callable[[str], None] | None = None) -> None:
    """Serve optuna-dashboard for study `name` until Ctrl-C.

    1. the study must exist (one-line errors from `load_study`);
    2. the port is bound; `warn` gets a note on who can reach it and do what (none on plain
       loopback), then `ready(link)` the address to open, with a generated token in it;
    3. requests are served until interrupted; Ctrl-C returns normally.

    `access`: default `access_for(host)`. `port` 0 picks a free port; the link names it.
    """
    from gemma_search.storage import open_storage
    from gemma_search.study import load_study

    access = access or access_for(host)
    load_study(name, url)  # StudyNotFoundError, unreachable storage: one line each
    storage = open_storage(url, must_exist=True)
    study_id = int(storage.get_study_id_from_name(name))  # the study exists: checked above

    import optuna_dashboard

    app = optuna_dashboard.wsgi(ReadOnlyStorage(storage) if access.read_only else storage)
    server = bind(Guard(Compress(app), access), host, port)
    bound = int(server.server_address[1])
    try:
        note = sharing_note(host, access)
        if note and warn is not None:
            warn(note)
        if ready is not None:
            shown = access.token if access.token_file is None else None
            ready(dashboard_link(host, bound, study_id, shown))
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a person stops a dashboard: not an error
    finally:
        server.server_close()
        storage.engine.dispose()
