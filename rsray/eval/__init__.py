"""Evaluation: the protocol's retrieval metrics, SMR re-ranking, and scoring galleries in bounded memory.

`metrics` turns a similarity matrix into R@K / mR / ranks / SR@K, `rerank` re-weights a matrix
(SMR), `scoring` builds the matrix (or only its top-k, for galleries too large to hold) from a
model's features. All of them order results the same way: descending score, ties by index.
"""
