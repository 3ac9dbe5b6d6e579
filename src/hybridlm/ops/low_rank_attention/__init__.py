"""Low-rank (Nyström) approximations of attention, bidirectional as published:

- ``nystrom``: Nyströmformer (Xiong et al. 2021, arXiv 2102.03902), softmax attention through landmarks that are
  segment means of the queries and of the keys: softmax(Q K̃ᵀ) softmax(Q̃ K̃ᵀ)⁺ softmax(Q̃ Kᵀ) V.
- ``skyformer``: Skyformer (Chen et al. 2021, arXiv 2111.00035), attention with a Gaussian kernel in place of
  softmax's exp, approximated by the Nyström method on the kernel matrix of queries and keys together (positive
  semi-definite, which softmax's is not), with landmarks sampled among them.

Both mix every token with every other through m landmarks that summarise the whole sequence, so neither has a causal
form that keeps its cost: the landmarks of a prefix change with every token appended, and no causal variant appears in
either paper. They are attention functions (q, k, v → output) for the bench, and have no causal LM mixer here.
``pinv`` holds the iterative pseudo-inverse both papers use.
"""
