"""The transcribe daemon: audio dropped in a folder becomes raw and corrected transcripts.

It is an HTTP client of the server (its own process, its own service): `folder` watches the inbox, `journal`
keeps each file's progress crash-safe, `pipeline` transcribes and corrects through the server, `daemon` ties
them together, and `cli` adds `mlxpool watch` and `mlxpool transcribe`.
"""
