"""The private PostgreSQL cluster that the suite starts (the server the scale-backend tests run against)."""

from __future__ import annotations

import sqlalchemy as sa

from mailbridge.db import SCHEMA_HEAD, Database


def test_a_new_database_is_migrated_to_the_newest_schema(postgres_url: str) -> None:
    database = Database(postgres_url)
    try:
        database.upgrade()
        with database.engine.connect() as connection:
            version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            server = connection.execute(sa.text("SHOW server_version")).scalar_one()
        assert version == SCHEMA_HEAD
        assert server.split(".")[0].isdigit()
    finally:
        database.engine.dispose()
