"""Thin click shells: parse, call deepsigns_cli.api, render. Nothing here imports torch at load."""
