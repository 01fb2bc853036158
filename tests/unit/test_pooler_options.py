"""lilota's own options in a PostgreSQL URL, for a transaction pooler (PgBouncer): checked
when the URL is parsed, removed before the driver sees them (tests/integration/
test_pgbouncer.py runs workers through a real PgBouncer)."""

from __future__ import annotations

import pytest

from lilota.dialects.urls import lilota_options, parse_url
from lilota.errors import ConfigurationError

BASE = "postgresql://app:secret@pgbouncer:6432/app"


def test_the_options_are_taken_out_of_the_url_the_driver_gets() -> None:
    url = parse_url(
        f"{BASE}?lilota_pooler=transaction&lilota_direct=db.internal:5432&sslmode=require"
    )
    server, pooler, direct = lilota_options(url)
    assert pooler == "transaction"
    assert dict(server.query) == {"sslmode": "require"}
    assert direct is not None
    assert (direct.host, direct.port, direct.database, direct.username) == (
        "db.internal",
        5432,
        "app",
        "app",
    )
    assert direct.password == "secret" and dict(direct.query) == {"sslmode": "require"}
    assert lilota_options(parse_url(BASE))[1:] == (None, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"{BASE}?lilota_pooler=statement", "lilota_pooler='statement': expected one of"),
        (f"{BASE}?lilota_direct=db", "lilota_direct='db': expected host:port"),
        (f"{BASE}?lilota_direct=db:99999", "lilota_direct='db:99999': expected host:port"),
        (f"{BASE}?lilota_pooler=transaction&lilota_pooler=session", "given once each"),
        ("sqlite:///x.db?lilota_pooler=transaction", "lilota_pooler is for PostgreSQL URLs"),
    ],
)
def test_bad_options_are_refused_when_the_url_is_parsed(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_url(url)
