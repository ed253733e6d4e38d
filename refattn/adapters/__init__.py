"""Adapters that run other frameworks' implementations against golden cases."""
