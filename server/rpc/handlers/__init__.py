"""FaceService's RPCs in groups, one class each, collaborators passed to __init__:

    stateless.py   Detect, CheckLiveness, Compare, Embed, Analyze, DetectBatch
    identity.py    Process, Register, Verify and the subject RPCs
    management.py  collections and API keys (the admin key's)
    search.py      Search, SearchByEmbedding, GetIndexStats
    streams.py     StreamFrames, ProcessBatch, RegisterBatch

Each class lists its RPCS; server/rpc/servicer.py routes every FaceService
method to the group that serves it.
"""
