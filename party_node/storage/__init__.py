"""Node storage: SQLAlchemy models and Alembic migrations of a party node's database."""
