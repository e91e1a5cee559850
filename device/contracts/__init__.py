"""Torch-free contracts shared by device/ and cloud/: config, wire schemas, file formats.

Each contract has exactly one definition here; both sides import it.
"""
