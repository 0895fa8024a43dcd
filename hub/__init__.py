"""The composition root: settings, storage, ingest, API, CLI."""
