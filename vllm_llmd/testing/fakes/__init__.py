"""Fakes for what cannot run on this project's CI machines (accelerators and their vendor stacks).

Each fake is written from the real package's source and cites the file and function it stands in
for; tests use them only where the real thing cannot run (see README, "Real parts, not mocks").
"""
