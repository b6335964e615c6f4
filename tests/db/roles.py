"""Roles for security tests: cluster-wide names made unique to one test database, and DSNs to log in as them."""

from __future__ import annotations

from matview.plan.observed import Connection


class Roles:
    """Role names unique to one test database (roles are cluster-wide), and DSNs to log in as them."""

    def __init__(self, dsn: str) -> None:
        self.suffix = dsn.rsplit("/", 1)[1]
        self.dsn = dsn

    def __getitem__(self, name: str) -> str:
        return f"{name}_{self.suffix}"

    def login(self, name: str) -> str:
        return self.dsn.replace("postgres@", f"{self[name]}@", 1)

    def drop(self, conn: Connection, *names: str) -> None:
        """Drop the roles and everything they own in this database."""
        for name in names:
            conn.execute(f"DROP OWNED BY {self[name]} CASCADE")
        for name in names:
            conn.execute(f"DROP ROLE {self[name]}")
