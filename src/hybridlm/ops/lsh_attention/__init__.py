"""LSH attention (Reformer, Kitaev et al. 2020, arXiv 2001.04451): shared-QK attention restricted to the keys a
locality-sensitive hash puts in the query's bucket, over several hash rounds.

``hashing`` draws the random rotations and hashes vectors into buckets (angular LSH: argmax over [xR; −xR]);
``reference`` is the attention written per query as a loop (the tests' oracle); ``sorted_chunks`` is the fast form:
sort by (bucket, position), cut into chunks, attend within a chunk and the one before it.

The key set of query i in one round is the ``chunk`` most recent keys j <= i of its bucket (itself included). In the
published form a query sees its sorted chunk and the previous one, so which keys it sees depends on where the chunk
boundaries fall, which depends on the buckets of *later* tokens: an earlier output changes when a token is appended.
Masking each query to keys at most ``chunk - 1`` places before it in its bucket's sorted order keeps the same work (the
two chunks always contain those keys) and makes the set depend on earlier tokens only, so the mixer is causal and its
decode step (the new token's bucket, its last ``chunk - 1`` keys) equals the full forward.
"""
