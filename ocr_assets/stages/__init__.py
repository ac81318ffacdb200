"""Pipeline stages: plain functions over Arrow tables that return `(table, StageReport)`."""
