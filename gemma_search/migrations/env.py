"""Alembic environment for gemma-search's own tables (`gs_*`), beside Optuna's in one database.

`gemma_search.db.upgrade` / `downgrade` (`gemma-search db upgrade`) build the Alembic config in
code and hand over an open connection in `config.attributes["connection"]` (Alembic's
"sharing a connection" recipe), so there is no alembic.ini. Two rules keep us and Optuna apart:
our version table is `gemma_search_alembic_version` (Optuna stamps `alembic_version`), and
`include_object` hides every table not named `gs_*` from autogenerate.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from gemma_search.db import VERSION_TABLE, Base, include_object
from gemma_search.storage import make_engine

config = context.config
target_metadata = Base.metadata

_OPTIONS: dict[str, Any] = {
    "target_metadata": target_metadata,
    "version_table": VERSION_TABLE,
    "include_object": include_object,
    # SQLite cannot ALTER most things: autogenerate writes batch operations that copy tables.
    "render_as_batch": True,
}


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database to migrate: call gemma_search.db.upgrade(URL), or "
                           "set config.attributes['connection'] or ['url']")
    return str(url)


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (`alembic upgrade --sql`)."""
    context.configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"},
                      **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())  # the one factory: no pool on PostgreSQL, SQLite's hooks
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
