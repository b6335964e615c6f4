"""The local PostgreSQL a newcomer gets when no database is configured (the operator image does not use it)."""
