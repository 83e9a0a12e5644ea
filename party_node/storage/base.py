"""Declarative base of the node database (all node tables hang off `NodeBase.metadata`).

Dataset *content* tables (created at ingest with the declared schema) are not part of this
metadata: they are catalogued in `datasets` and named `ds_<dataset>_v<version>`.
"""

from sqlalchemy.orm import DeclarativeBase


class NodeBase(DeclarativeBase):
    pass


DATA_TABLE_PREFIX = "ds_"
