"""The consent service's tables (directives arrive with the consent issue; the outbox now)."""

from sqlalchemy import MetaData

from services.shared.outbox import outbox_table

metadata = MetaData()
outbox_table(metadata)
