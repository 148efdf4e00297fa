"""Edge and node names interned per model as small integer ids.

Names are never deleted, so a committed (model, name) -> id pair never changes: each
process keeps the pairs it has seen committed in a cache (one per connection pool, i.e.
per `Database`), and only unseen names cost a query. Pairs read or inserted inside a
transaction enter the cache when it commits.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from edgeprune.storage.sqlutil import dialect_name, insert_ignore

_CHUNK = 500  # names per IN (...) list
# New names at which PostgreSQL gets fresh statistics for the table (autovacuum may be off).
_ANALYZE_AFTER = 1000

_Cache = dict[tuple[str, str], dict[str, int]]  # (table, model) -> {name: id}
_committed: weakref.WeakKeyDictionary[Pool, _Cache] = weakref.WeakKeyDictionary()


def intern_names(
    session: Session, table: Any, groups: Iterable[tuple[str, Sequence[str]]]
) -> dict[str, dict[str, int]]:
    """{model: {name: id}} for every name in `groups`, inserting names not seen before
    (new names take ids in the order given)."""
    wanted: dict[str, dict[str, None]] = defaultdict(dict)  # insertion-ordered sets
    for model, names in groups:
        wanted[model].update(dict.fromkeys(names))
    cache = _cache(session)
    interned: dict[str, dict[str, int]] = {}
    for model, names in wanted.items():
        known = cache.get((table.__tablename__, model), {})
        ids = {n: known[n] for n in names if n in known}
        ids.update(_lookup(session, table, model, [n for n in names if n not in ids]))
        missing = [n for n in names if n not in ids]
        if missing:
            insert_ignore(session, table, [{"model": model, "name": n} for n in missing],
                          ["name", "model"])
            ids.update(_lookup(session, table, model, missing))
            if len(missing) >= _ANALYZE_AFTER and dialect_name(session) == "postgresql":
                session.execute(text(f"ANALYZE {table.__tablename__}"))
        session.info.setdefault("interned", []).append(
            (session.get_bind().pool, (table.__tablename__, model), ids)
        )
        interned[model] = ids
    return interned


def name_ids(session: Session, table: Any, model: str | None, name: str) -> list[int]:
    """Ids of `name` (one per model that has it, or just `model`'s); [] if unknown."""
    if model is not None:
        cached = _cache(session).get((table.__tablename__, model), {}).get(name)
        if cached is not None:
            return [cached]
    query = select(table.id).where(table.name == name)
    if model is not None:
        query = query.where(table.model == model)
    return list(session.scalars(query))


def _cache(session: Session) -> _Cache:
    return _committed.get(session.get_bind().pool, {})


def _lookup(session: Session, table: Any, model: str, names: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for start in range(0, len(names), _CHUNK):
        chunk = names[start : start + _CHUNK]
        rows = session.execute(
            select(table.name, table.id).where(table.model == model, table.name.in_(chunk))
        )
        ids.update({name: id_ for name, id_ in rows})
    return ids


@event.listens_for(Session, "after_commit")
def _publish(session: Session) -> None:
    for pool, key, ids in session.info.pop("interned", ()):
        _committed.setdefault(pool, {}).setdefault(key, {}).update(ids)


@event.listens_for(Session, "after_rollback")
def _discard(session: Session) -> None:
    session.info.pop("interned", None)
